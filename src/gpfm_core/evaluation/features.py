"""Features for evaluation: embedded tile images (cached), and per-slide feature files.

* :func:`embed_images` — runs an encoder over labelled image files (CRC-100K style) and
  keeps the result in one HDF5 cache per encoder; an image is embedded again only when its
  bytes, the encoder or its weights change.
* :func:`find_slide_features` — the features file of every slide id under a folder,
  searched recursively (so a folder per encoder and tiling, TRIDENT's
  ``<job>/<mag>x_<px>px_<overlap>px_overlap/features_<encoder>/``, or a flat folder all
  work): the file a cohort table beside it names by that slide_id, else ``<slide>.h5``.
  When a slide has several files, the one whose ``encoder`` attribute matches wins.
* :func:`slide_tile_features` — the rows of embedded slides at labelled level-0 ``(x, y)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core._atomic import atomic_path
from gpfm_core.errors import GpfmError

__all__ = [
    "EncoderInfo",
    "embed_images",
    "find_slide_features",
    "slide_tile_features",
    "strip_slide_suffix",
]

log = logging.getLogger(__name__)

#: Suffixes dropped from a CSV's slide id to find ``<stem>.h5`` (``TCGA-xx.svs`` -> ``TCGA-xx``).
_SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".czi",
    ".dcm", ".isyntax", ".png", ".jpg", ".jpeg", ".h5",
)  # fmt: skip


@dataclass(frozen=True)
class EncoderInfo:
    """What made a set of features: recorded with every result.

    Attributes
    ----------
    name, weights_hash, embed_dim
        The encoder.
    tiling
        ``{"mpp": ..., "tile_px": ...}`` for slide features, ``{"input_px": ...}`` for images.
    """

    name: str
    weights_hash: str
    embed_dim: int
    tiling: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name,
            "weights_hash": self.weights_hash,
            "embed_dim": self.embed_dim,
            "tiling": self.tiling,
        }


def strip_slide_suffix(slide_id: str) -> str:
    """A CSV's slide id as the stem of its features file."""
    s = str(slide_id).strip()
    low = s.lower()
    for suf in _SLIDE_SUFFIXES:
        if low.endswith(suf):
            return s[: -len(suf)]
    return s


def _file_key(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise GpfmError(f"image {path} not found: fix the task's items CSV") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise GpfmError(f"image {path} cannot be read ({exc}): replace or drop it") from None


def _read_cache(cache: Path, name: str, weights_hash: str) -> dict[str, np.ndarray]:
    import h5py

    if not cache.is_file():
        return {}
    try:
        with h5py.File(cache, "r") as f:
            if f.attrs.get("encoder") != name or f.attrs.get("weights_hash") != weights_hash:
                return {}
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][:]]
            feats = np.asarray(f["features"][:], dtype=np.float32)
    except (OSError, KeyError) as exc:
        log.warning("ignoring unreadable feature cache %s: %s", cache, exc)
        return {}
    return dict(zip(keys, feats, strict=True))


def embed_images(
    paths: Sequence[str | os.PathLike[str]],
    encoder: str,
    *,
    cache: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, EncoderInfo]:
    """Embed image files with an encoder (resized to its input size), with a disk cache.

    Parameters
    ----------
    paths
        Image files (any size, RGB or convertible).
    encoder
        Registry name or checkpoint path (:func:`gpfm_core.encoders.create_encoder`).
    cache
        HDF5 file holding the features by image content hash; reused rows are not embedded
        again, the file is rewritten atomically with every image of this call.
    device, batch_size
        Where and how many images per forward pass.
    progress
        Called as ``progress(done, total)``.

    Returns
    -------
    tuple
        ``features`` (N, D) float32 in the order of ``paths``, and :class:`EncoderInfo`.
    """
    import h5py
    import torch

    from gpfm_core.embed import resolve_device, resolve_encoder
    from gpfm_core.encoders import preprocess

    files = [Path(p) for p in paths]
    keys = [_file_key(p) if p.is_file() else "" for p in files]
    missing = [str(p) for p, k in zip(files, keys, strict=True) if not k]
    if missing:
        raise GpfmError(
            f"{len(missing)} image(s) not found, e.g. {missing[0]}: fix the task's items CSV"
        )
    dev = resolve_device(device)
    enc = resolve_encoder(encoder, dev)
    meta = enc.meta
    info = EncoderInfo(
        str(meta.name),
        str(getattr(enc, "weights_hash", None) or "none"),
        int(meta.embed_dim),
        {"input_px": int(meta.input_px), "source": "images"},
    )
    known = _read_cache(Path(cache), info.name, info.weights_hash) if cache else {}
    todo = [i for i, k in enumerate(keys) if k not in known]
    log.info("%s: %d images, %d cached", info.name, len(files), len(files) - len(todo))
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = defaultdict(list)
    done = len(files) - len(todo)
    new: dict[str, np.ndarray] = {}

    def flush(batch: list[tuple[int, np.ndarray]]) -> None:
        nonlocal done
        with torch.inference_mode():
            x = preprocess(np.stack([a for _, a in batch]), meta, device=dev)
            feats = enc(x).float().cpu().numpy()
        for (i, _), f in zip(batch, feats, strict=True):
            new[keys[i]] = f
        done += len(batch)
        if progress is not None:
            progress(done, len(files))

    for i in todo:
        img = _load_rgb(files[i])
        group = by_shape[img.shape]
        group.append((i, img))
        if len(group) >= batch_size:
            flush(group)
            group.clear()
    for group in by_shape.values():
        if group:
            flush(group)
    known.update(new)
    features = np.stack([known[k] for k in keys]).astype(np.float32)
    if cache and new:
        uniq = list(dict.fromkeys(keys))
        with atomic_path(cache, parents=True) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.stack([known[k] for k in uniq]))
            f.create_dataset("keys", data=np.array(uniq, dtype="S40"))
            f.attrs["encoder"] = info.name
            f.attrs["weights_hash"] = info.weights_hash
    return features, info


def find_slide_features(
    folder: str | os.PathLike[str],
    slide_ids: Sequence[str],
    *,
    encoder: str | None = None,
    missing: str = "error",
) -> dict[str, Path]:
    """The features file of each slide id under ``folder`` (searched recursively).

    Parameters
    ----------
    folder
        Where the ``<slide>.h5`` files lie (any depth).
    slide_ids
        Ids from the task CSV. Where a cohort table lies with the files (``cohort.csv`` of
        ``gpfm embed --out``, in a file's folder or the two above:
        :func:`gpfm_core.cohort.table.rows_beside`), an id is first the table's
        ``slide_id`` (the manifest's, e.g. ``case-002`` for ``siteB/S01.tif``); else the
        file's stem, a slide-file suffix (``.svs`` ...) ignored.
    encoder
        When a slide has several files, keep those whose ``encoder`` attribute is this.
    missing
        ``"error"``: a slide without a file is a :class:`GpfmError`; ``"skip"``: it is
        left out (with a warning).

    Returns
    -------
    dict
        Slide id -> file, for every slide found.

    Raises
    ------
    GpfmError
        Missing folder; missing files (``missing="error"``); several matching files; a
        cohort table that cannot be read.
    """
    from gpfm_core.cohort.table import rows_beside
    from gpfm_core.embed import read_attrs

    root = Path(folder)
    if not root.is_dir():
        raise GpfmError(
            f"features folder {root} not found: embed the slides first (gpfm embed --out {root})"
        )
    files = sorted(Path(os.path.normpath(p)) for p in root.rglob("*.h5"))
    index: dict[str, list[Path]] = defaultdict(list)
    for p in files:
        index[p.stem].append(p)
    # a cohort table beside the files (gpfm embed --out) names them by the manifest's slide_id
    named: dict[str, list[Path]] = defaultdict(list)
    for p, row in rows_beside(files).items():
        if p in index.get(p.stem, ()):
            named[row.slide_id].append(p)
    found: dict[str, Path] = {}
    absent: list[str] = []
    for sid in slide_ids:
        key = str(sid).strip()
        cands = named.get(key) or index.get(strip_slide_suffix(key), [])
        if len(cands) > 1 and encoder is not None:
            cands = [p for p in cands if str(read_attrs(p).get("encoder", "")) == encoder] or cands
        if len(cands) > 1:
            raise GpfmError(
                f"slide {sid} has {len(cands)} feature files under {root} ({cands[0]}, {cands[1]}): "
                "point features: at one encoder's folder"
            )
        if cands:
            found[sid] = cands[0]
        else:
            absent.append(sid)
    if absent:
        msg = (
            f"{len(absent)} of {len(slide_ids)} slide(s) have no features file under {root} "
            "(by a cohort table's slide_id, or <slide>.h5) "
            f"(e.g. {absent[0]})"
        )
        if missing == "error":
            raise GpfmError(msg + ": embed them, or set missing: skip in the task")
        import warnings

        warnings.warn(msg + "; they are left out", stacklevel=2)
    return found


def slide_encoder_info(paths: Mapping[str, Path], encoder: str) -> EncoderInfo:
    """Encoder, weights hash and tiling of a cohort's feature files (from their attributes).

    Files of different encoders or weights are a :class:`GpfmError`.
    """
    from gpfm_core.embed import read_attrs

    seen: dict[tuple[str, str], str] = {}
    first: dict[str, Any] = {}
    for sid, p in paths.items():
        a = read_attrs(p)
        key = (str(a.get("encoder", encoder)), str(a.get("weights_hash", "unknown")))
        if not seen:
            first = a
        seen.setdefault(key, sid)
        if len(seen) > 1:
            (k1, s1), (k2, s2) = list(seen.items())[:2]
            raise GpfmError(
                f"feature files of different encoders or weights ({k1[0]} {k1[1][:12]} for {s1}, "
                f"{k2[0]} {k2[1][:12]} for {s2}): use one encoder's folder"
            )
    ((name, whash),) = list(seen) if seen else [(encoder, "unknown")]
    tiling = {
        k: first[k]
        for k in (
            "requested_mpp",
            "effective_mpp",
            "tile_px",
            "overlap_px",
            "min_tissue",
            "patch_size",
        )
        if k in first
    }
    dim = 0
    if paths:
        import h5py

        with h5py.File(next(iter(paths.values())), "r") as f:
            dim = int(f["features"].shape[-1])
    return EncoderInfo(name, whash, dim, tiling)


def slide_tile_features(rows: Sequence[Mapping[str, str]], files: Mapping[str, Path]) -> np.ndarray:
    """Features of labelled tiles of embedded slides, matched on level-0 ``(x, y)``.

    Parameters
    ----------
    rows
        Items with ``slide_id``, ``x``, ``y`` (the tile's top-left corner, as in ``coords``).
    files
        Slide id -> features file.

    Returns
    -------
    numpy.ndarray
        (N, D) float32 in the order of ``rows``.

    Raises
    ------
    GpfmError
        A slide without a file, or a corner that is not a tile of its slide.
    """
    from gpfm_core.embed import load_embeddings

    by_slide: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_slide[r["slide_id"]].append(i)
    out: np.ndarray | None = None
    for sid, idx in by_slide.items():
        if sid not in files:
            raise GpfmError(f"slide {sid} has no features file: embed it first")
        emb = load_embeddings(files[sid])
        lookup = {(int(x), int(y)): j for j, (x, y) in enumerate(emb.coords)}
        if out is None:
            out = np.empty((len(rows), emb.embed_dim), np.float32)
        for i in idx:
            try:
                xy = (int(float(rows[i]["x"])), int(float(rows[i]["y"])))
            except ValueError:
                raise GpfmError(f"row {i + 1}: x and y must be numbers") from None
            if xy not in lookup:
                raise GpfmError(
                    f"slide {sid} has no tile at x={xy[0]}, y={xy[1]} (level-0 top-left): "
                    "use the coords of its features file"
                )
            out[i] = emb.features[lookup[xy]]
    assert out is not None
    return out
