"""The demo's own small cohort, so ``make demo`` shows the Retrieve tab's "search the cohort".

:func:`make_demo_cohort` (library only, no Qt) writes a few small slides generated from the
sample slide (:func:`gpfm_core.cohort.synth.write_slide_cohort`) and embeds them, with the
sample slide itself, as ``gpfm embed --out FOLDER`` does (:func:`gpfm_core.cohort.run_cohort`
with ``index=True``: feature files, cohort table and the folder's similarity index).
:func:`add_cohort_search` does that into the dock's embeddings folder with the dock's encoder
and tiling (so the sample, embedded by the dock already, is reused, not computed again) and
points the Retrieve tab at that folder, then asks the demo's query again, of the cohort.

Everything is kept: a second start generates, embeds and indexes nothing (every slide is
skipped as done, the index is current), so the cohort costs its seconds once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    from gpfm_core.cohort import CohortRun, EmbedSettings
    from napari_gpfm._widget._dock import GpfmDock
    from napari_gpfm._widget._session import SlideSession

__all__ = ["COHORT_SLIDES", "COHORT_SLIDE_SIZE", "add_cohort_search", "make_demo_cohort"]

#: Slides generated for the demo's cohort (besides the sample slide itself).
COHORT_SLIDES = 3
#: Level-0 (width, height) of each generated slide, px (at 0.5 µm/px: tens of tiles each).
COHORT_SLIDE_SIZE = (1536, 1152)


def make_demo_cohort(
    folder: str | os.PathLike[str],
    *,
    slides_dir: str | os.PathLike[str],
    sample: str | os.PathLike[str],
    settings: EmbedSettings,
    n_slides: int = COHORT_SLIDES,
) -> CohortRun:
    """Write and embed the demo cohort: ``sample`` and ``n_slides`` slides generated from it.

    Parameters
    ----------
    folder
        The cohort folder: what ``gpfm embed --out`` writes (feature files, cohort table,
        ``reports/``, each feature folder's ``gpfm_index``). A feature file of ``sample``
        already there with these settings is reused.
    slides_dir
        Where the generated slides (``slides/cohort-<i>.svs``) and their ``manifest.csv`` go.
    sample
        The sample slide: listed first, and the tissue the generated slides are mosaics of.
    settings
        Encoder, tiling and device of the embedding (the dock's, so its session fits the
        cohort's index).
    n_slides
        Generated slides (:data:`COHORT_SLIDE_SIZE` each, 0.5 µm/px).

    Returns
    -------
    CohortRun
        The run (every slide ``skipped`` when the cohort was made before).

    Raises
    ------
    GpfmError
        A slide could not be embedded or the index could not be written (one line).
    """
    from gpfm_core.cohort import read_cohort_inputs, run_cohort
    from gpfm_core.cohort.synth import write_slide_cohort

    manifest = write_slide_cohort(
        slides_dir, n_slides=n_slides, size=COHORT_SLIDE_SIZE, mpp=0.5, sources=[sample],
        include=[sample],
    )  # fmt: skip
    run = run_cohort(read_cohort_inputs([manifest]), out_dir=folder, settings=settings, index=True)
    if run.failed or run.index_errors:
        why = run.failed[0].error if run.failed else next(iter(run.index_errors.values()))
        raise GpfmError(f"the demo cohort in {folder} could not be made: {why}")
    return run


def add_cohort_search(
    dock: GpfmDock,
    session: SlideSession,
    *,
    sample: str | os.PathLike[str],
    slides_dir: str | os.PathLike[str],
) -> CohortRun:
    """Make the demo cohort in the dock's embeddings folder, with the dock's encoder and
    ``session``'s tiling (``session`` is ``sample``'s), and let the Retrieve tab search it.

    The generated slides go to ``slides_dir``. The folder is not remembered as the user's
    cohort (``remember=False``). When the session has a query tile (the demo's), it is asked
    again, now of the cohort, so the gallery shows the cohort's top tiles and thumbnails.

    Returns
    -------
    CohortRun
        See :func:`make_demo_cohort`.
    """
    from gpfm_core.cohort import EmbedSettings

    settings = EmbedSettings(
        encoder=dock.embed_tab.encoder_combo.currentText().strip(),
        mpp=float(session.tiling["requested_mpp"]),
        tile_px=int(session.tiling["tile_px"]),
        device=dock.embed_tab.device_combo.currentText(),
    )
    folder = Path(dock.embed_tab.out_dir)
    run = make_demo_cohort(folder, slides_dir=slides_dir, sample=sample, settings=settings)
    tab = dock.retrieve_tab
    tab.set_cohort_folder(folder, remember=False)
    if session.query_index is not None:
        tab.query_tile(session, session.query_index, sync=True)
    n_tiles = sum(max(r.n_tiles, 0) for r in run.reports)
    print(
        f"napari-gpfm demo: cohort search over {len(run.reports)} slides ({n_tiles} tiles, "
        f"{run.count('skipped') + run.count('reused')} of them cached) in {folder}",
        flush=True,
    )
    return run
