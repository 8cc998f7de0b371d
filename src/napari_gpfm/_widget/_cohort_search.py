"""The cohort behind the Retrieve tab's "search the cohort" mode (no Qt widgets here).

A cohort folder is what ``gpfm embed --out COHORT`` wrote (or any folder holding a cohort
index, :mod:`gpfm_core.cohort.index`). A query comes from an open slide's session: the index
used is the one of the session's encoder, weights and tiling
(:func:`gpfm_core.cohort.find_index` with the session's :class:`~gpfm_core.cohort.FeatureGroup`),
opened once and refreshed when its manifest changes (slides added by a run still going).

Scores are the index's: cosines of features centred on the running *cohort* mean. In this
mode the heatmaps (the clicked slide's, and those of hits opened from the gallery) are
centred on the same mean, so a hit's score in the gallery is its value on its slide's
heatmap. The query direction is taken in that centred space
(``center_features(features[tiles], mean=cohort mean, unit=True)`` averaged), so one tile
and its 3x3 neighbourhood are queried as in the open-slides mode.

The folder chosen is remembered (``QSettings``, key :data:`SETTINGS_KEY`); the mode itself
starts off, so a dock opens searching the open slides as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    from gpfm_core.cohort import CohortHit, CohortIndex, FeatureGroup
    from napari_gpfm._widget._session import SlideSession

log = logging.getLogger(__name__)

#: QSettings key of the last cohort folder chosen.
SETTINGS_KEY = "retrieve/cohort_folder"


def _settings() -> Any:
    from qtpy.QtCore import QSettings

    # an INI file, so a test (or a user) can point QSettings.setPath elsewhere
    return QSettings(
        QSettings.Format.IniFormat, QSettings.Scope.UserScope, "napari-gpfm", "napari-gpfm"
    )


def remembered_folder() -> Path | None:
    """The cohort folder chosen last (any dock, any session), or None."""
    value = _settings().value(SETTINGS_KEY, "")
    return Path(str(value)) if value else None


def remember_folder(folder: str | os.PathLike[str]) -> None:
    """Remember ``folder`` as the cohort to search (see :func:`remembered_folder`)."""
    settings = _settings()
    settings.setValue(SETTINGS_KEY, str(folder))
    settings.sync()


def session_group(session: SlideSession) -> FeatureGroup:
    """The :class:`~gpfm_core.cohort.FeatureGroup` of a session: which cohort index fits it."""
    from gpfm_core.cohort import feature_group

    return feature_group(
        {"encoder": session.encoder, "weights_hash": session.weights_hash, **session.tiling}
    )


def cohort_similarity(session: SlideSession, mean: np.ndarray) -> Any:
    """The session's features centred on a cohort ``mean`` (D,) and normalised, cached.

    A :class:`~gpfm_core.analysis.SimilarityIndex`, rebuilt only when the mean changes
    (slides added to or removed from the cohort).
    """
    from gpfm_core.analysis import SimilarityIndex

    key = hashlib.blake2b(np.ascontiguousarray(mean, np.float32).tobytes(), digest_size=8)
    cached = session.cache.get("cohort_similarity")
    if cached is None or cached[0] != key.hexdigest():
        cached = (key.hexdigest(), SimilarityIndex(session.features, center=mean))
        session.cache["cohort_similarity"] = cached
    return cached[1]


@dataclass(frozen=True)
class CohortQuery:
    """One cohort search: where it ran and what it asked.

    Attributes
    ----------
    index : CohortIndex
        The index searched.
    mean : numpy.ndarray
        (D,) float32 cohort mean the scores are centred on.
    direction : numpy.ndarray
        (D,) float32 unit query direction in the cohort-centred space.
    scores : numpy.ndarray
        (N,) float32 scores of the query slide's tiles.
    hits : list of CohortHit
        The top k tiles of the cohort, best first.
    """

    index: CohortIndex
    mean: np.ndarray
    direction: np.ndarray
    scores: np.ndarray
    hits: list[CohortHit]

    def scores_of(self, session: SlideSession) -> np.ndarray:
        """(N,) float32 the same query on another slide's session (centred on the same mean)."""
        return cohort_similarity(session, self.mean).query(self.direction, centred=True)


class CohortSearch:
    """The cohort folder of the Retrieve tab and its indexes, opened once each.

    Parameters
    ----------
    folder
        The cohort folder (None: none chosen yet).
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder: Path | None = Path(folder) if folder else None
        self._indexes: dict[Path, tuple[Any, tuple[int, int]]] = {}

    def set_folder(self, folder: str | os.PathLike[str] | None) -> None:
        """Search ``folder`` from now on (the indexes of the previous one are dropped)."""
        new = Path(folder) if folder else None
        if new != self.folder:
            self._indexes.clear()
        self.folder = new

    def index_for(self, session: SlideSession) -> CohortIndex:
        """The cohort index for ``session``'s encoder, weights and tiling, current.

        Raises
        ------
        GpfmError
            No folder chosen; no index there of the session's features (the message names
            what the cohort holds); an index of another feature width.
        """
        from gpfm_core.cohort import CohortIndex, find_index

        if self.folder is None:
            raise GpfmError("no cohort folder chosen: pick one with 'Cohort folder…'")
        index_dir = find_index(self.folder, group=session_group(session)).resolve()
        stamp = _stamp(index_dir)
        held = self._indexes.get(index_dir)
        if held is None:
            idx = CohortIndex.open(index_dir)
        else:
            idx = held[0]
            if held[1] != stamp:  # another process added or removed slides meanwhile
                idx.refresh()
        self._indexes[index_dir] = (idx, stamp)
        d = int(session.features.shape[1])
        if idx.dim != d:
            raise GpfmError(
                f"the cohort index holds {idx.dim}-d features but {session.name} has {d}-d ones: "
                "embed the slide with the cohort's encoder"
            )
        return idx

    def query(
        self, session: SlideSession, tiles: np.ndarray, *, k: int, exclude_row: int | None = None
    ) -> CohortQuery:
        """Search the cohort with the tiles ``tiles`` of ``session`` (their mean direction).

        Parameters
        ----------
        session
            The open slide clicked.
        tiles
            (Q,) int64 rows of ``session`` (one tile, or its neighbourhood).
        k
            Hits wanted.
        exclude_row
            A row of ``session`` not to return (the clicked tile) when the slide is in the
            cohort.

        Returns
        -------
        CohortQuery
        """
        idx = self.index_for(session)
        mean = idx.mean
        sim = cohort_similarity(session, mean)
        direction = sim.direction(np.asarray(tiles, dtype=np.int64))
        scores = sim.query(direction, centred=True)
        exclude = []
        if exclude_row is not None and any(s.slide_id == session.key for s in idx.slides):
            x, y = session.tile_center(int(exclude_row))
            with contextlib.suppress(GpfmError):  # a tile it cannot place is not excluded
                row = idx.tile_at(session.key, x, y)
                if row is not None:
                    exclude.append((session.key, int(row)))
        # the index centres the query on its mean: mean + direction is the direction itself
        hits = idx.search(mean + direction, int(k), exclude_tiles=exclude)
        return CohortQuery(idx, mean, direction, scores, hits)


def _stamp(index_dir: Path) -> tuple[int, int]:
    """(mtime, size) of an index's manifest: it changes with every commit."""
    from gpfm_core.cohort.index import MANIFEST

    st = (index_dir / MANIFEST).stat()
    return int(st.st_mtime_ns), int(st.st_size)
