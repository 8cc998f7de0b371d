"""Feature files of a cohort: found under folders, grouped by what made them.

Features are comparable only when one encoder with one set of weights embedded tiles of
one size at one resolution. :func:`feature_group` reads that from a file's attributes
(gpfm's own names, or TRIDENT's for files gpfm did not write) and :func:`group_files`
refuses, in one line, a set of files that mixes groups.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Suffix of a finished per-slide feature file (``.h5.partial`` and hidden temporaries are not).
FEATURE_SUFFIX = ".h5"


class FeatureFilesError(GpfmError):
    """Feature files are missing, unreadable, or made by different encoders / tilings."""


@dataclass(frozen=True)
class FeatureGroup:
    """What made a feature file: files in one group can share one index.

    Attributes
    ----------
    encoder, weights_hash : str
        Encoder name and the hash of its weights (``"unknown"`` when the file lacks it).
    tile_px : int
        Tile side in pixels as fed to the encoder.
    mpp : float
        Requested µm/px of the tiles (rounded to 4 decimals).
    overlap_px : int
        Overlap between neighbouring tiles, px at ``mpp``.
    """

    encoder: str
    weights_hash: str
    tile_px: int
    mpp: float
    overlap_px: int

    def describe(self) -> str:
        """One human-readable phrase, e.g. ``tiny-vit (weights 1a2b3c4d5e6f), 224 px at 0.5 µm/px``."""
        ov = f", overlap {self.overlap_px} px" if self.overlap_px else ""
        return (
            f"{self.encoder} (weights {self.weights_hash[:12]}), "
            f"{self.tile_px} px at {self.mpp:g} µm/px{ov}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the inverse of ``FeatureGroup(**d)``)."""
        return {
            "encoder": self.encoder,
            "weights_hash": self.weights_hash,
            "tile_px": self.tile_px,
            "mpp": self.mpp,
            "overlap_px": self.overlap_px,
        }


def feature_group(attrs: Mapping[str, Any]) -> FeatureGroup:
    """The :class:`FeatureGroup` of a file from its attributes (``read_attrs``).

    gpfm writes ``encoder``, ``weights_hash``, ``tile_px``, ``requested_mpp`` and
    ``overlap_px``; TRIDENT writes ``encoder`` (on ``features``), ``patch_size``,
    ``target_magnification`` (10 µm/px at 1x) and ``overlap`` (on ``coords``). Missing
    values become ``"unknown"`` / 0, so two foreign files without them still group together.
    """
    encoder = str(attrs.get("encoder") or "unknown")
    weights = str(attrs.get("weights_hash") or "unknown")
    tile_px = int(attrs.get("tile_px") or attrs.get("patch_size") or 0)
    mpp = attrs.get("requested_mpp") or attrs.get("effective_mpp")
    if not mpp and attrs.get("target_magnification"):
        mpp = 10.0 / float(attrs["target_magnification"])
    overlap = int(attrs.get("overlap_px", attrs.get("overlap", 0)) or 0)
    return FeatureGroup(encoder, weights, tile_px, round(float(mpp or 0.0), 4), overlap)


def find_feature_files(sources: PathLike | Iterable[PathLike]) -> list[Path]:
    """Feature files named directly or found recursively under folders.

    Parameters
    ----------
    sources
        One path or several: ``.h5`` files, or folders searched recursively for ``*.h5``
        (hidden files and folders, e.g. temporaries and ``.partial`` files, are skipped).

    Returns
    -------
    list of Path
        Resolved paths, unique, sorted within each folder, in the order given.

    Raises
    ------
    FeatureFilesError
        A path does not exist, a named file is not ``.h5``, or nothing was found.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in sources:
        p = Path(raw)
        if not p.exists():
            raise FeatureFilesError(f"{p} does not exist; give feature files (.h5) or folders")
        if p.is_dir():
            hits = sorted(
                q
                for q in p.rglob(f"*{FEATURE_SUFFIX}")
                if q.is_file() and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
        elif p.suffix == FEATURE_SUFFIX:
            hits = [p]
        else:
            raise FeatureFilesError(f"{p} is not a feature file (.h5); give .h5 files or folders")
        for q in hits:
            r = q.resolve()
            if r not in seen:
                seen.add(r)
                found.append(r)
    if not found:
        names = ", ".join(str(s) for s in sources) or "(nothing)"
        raise FeatureFilesError(f"no feature files (.h5) under {names}; embed the slides first")
    return found


def group_files(paths: Iterable[PathLike]) -> tuple[FeatureGroup, list[Path]]:
    """Read each file's attributes and check that all belong to one :class:`FeatureGroup`.

    Returns
    -------
    (FeatureGroup, list of Path)
        The common group and the paths.

    Raises
    ------
    FeatureFilesError
        A file is missing or unreadable, or the files come from more than one group.
    """
    from gpfm_core.embed.loading import EmbeddingsFileError, read_attrs

    groups: dict[FeatureGroup, list[Path]] = {}
    files = [Path(p) for p in paths]
    for p in files:
        try:
            g = feature_group(read_attrs(p))
        except EmbeddingsFileError as exc:
            raise FeatureFilesError(str(exc)) from None
        groups.setdefault(g, []).append(p)
    if not groups:
        raise FeatureFilesError("no feature files given")
    if len(groups) > 1:
        parts = "; ".join(
            f"{len(v)} x {g.describe()} (e.g. {v[0].name})" for g, v in groups.items()
        )
        raise FeatureFilesError(
            f"feature files from {len(groups)} encoders/tilings cannot share one index: {parts}; "
            "index each encoder's folder separately"
        )
    (group,) = groups
    return group, files
