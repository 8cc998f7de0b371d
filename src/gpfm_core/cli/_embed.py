"""``gpfm embed SLIDE|GLOB|MANIFEST.csv... --encoder NAME|PATH``: one feature file per slide.

``<out>/<mpp>mpp_<tile_px>px_<overlap>px_overlap/features_<encoder>-<hash8>/<slide_stem>.h5``
(see :mod:`gpfm_core.embed.layout`), the cohort table ``<out>/cohort.csv`` and a run report
``<out>/reports/embed-<time>-<pid>.csv``. Inline by default; ``--cluster local[:N]`` or
``--scheduler ADDRESS`` runs one dask task per slide (:mod:`gpfm_core.cohort`). A cohort
run (a manifest, a glob, several slides, or a cluster) also keeps the similarity index of
the feature folder current as slides finish (``<features folder>/gpfm_index``, see
:mod:`gpfm_core.cohort.index`); ``--no-index`` skips it, ``--index`` asks for it with one slide.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

from gpfm_core.cli._tiles import add_tissue_arguments, tissue_options
from gpfm_core.errors import GpfmError

DEFAULT_OUT = "gpfm_embeddings"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm embed``."""
    p = subparsers.add_parser(
        "embed",
        help="embed every tissue tile of one or more slides (TRIDENT/CLAM HDF5)",
        description=(
            "Embed every tissue tile of each slide with an encoder and write "
            "<out>/<mpp>mpp_<tile>px_<overlap>px_overlap/features_<encoder>-<hash8>/"
            "<slide_stem>.h5 (datasets features (N, D), coords (N, 2) level-0 x,y); a slide "
            "listed after another of the same stem gets <slide_stem>-<content id[:8]>.h5 "
            "(and that slide_id, unless a manifest names it). A slide embedded by "
            "another process at the same time is waited for and reused. A slide that fails "
            "is reported and the others continue; the exit status is 1 if any failed. "
            "A cohort is given as slide files, globs ('slides/**/*.svs') or manifests "
            "(CSV with a 'path' column, optional 'slide_id' and 'mpp'); slides already "
            "embedded with these settings (per <out>/cohort.csv) are skipped. A run report "
            "(one CSV row per slide: status, tiles, seconds per stage, error) is written at "
            "the end."
        ),
    )
    p.add_argument(
        "slides",
        nargs="+",
        metavar="SLIDE",
        help="slide files, globs, or manifests (.csv: path[,slide_id][,mpp])",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster",
        metavar="local[:N]",
        default=None,
        help="run on a dask LocalCluster of N worker processes (default N: one per GPU, "
        "else half the cores)",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="run on an existing dask cluster (e.g. tcp://host:8786; dask-jobqueue, "
        "Kubernetes, 'dask worker --resources GPU=1' per GPU)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="tries again a slide whose failure may pass (worker died, I/O error) this many "
        "times (default: %(default)s)",
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="CSV",
        help="run report path (default: <out>/reports/embed-<time>-<pid>.csv)",
    )
    p.add_argument(
        "--index",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add each slide, as it finishes, to the similarity index of its feature folder "
        "(<features folder>/gpfm_index; see gpfm index). Default: on for a cohort (a manifest, "
        "a glob, several slides or a cluster), off for one slide",
    )
    p.add_argument(
        "--encoder",
        default="default",
        help="registry name or checkpoint path (default: %(default)s)",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="weights file for --encoder, e.g. --encoder timm:NAME --weights FILE "
        "(wins over GPFM_WEIGHTS and the Hugging Face cache)",
    )
    p.add_argument(
        "--mpp", type=float, default=None, help="µm/px of the tiles (default: the encoder's)"
    )
    p.add_argument(
        "--tile-px",
        type=int,
        default=None,
        help="tile side in px at --mpp (default: the encoder's)",
    )
    p.add_argument("--overlap", type=int, default=0, help="overlap between tiles in px at --mpp")
    p.add_argument(
        "--min-tissue", type=float, default=0.25, help="least tissue fraction kept (default: 0.25)"
    )
    p.add_argument(
        "--slide-mpp", type=float, default=None, help="override the slides' level-0 µm/px"
    )
    add_tissue_arguments(p)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: ./%(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help=(
            "compute precision; auto: bf16 on CUDA, on CPU int8 when it is faithful to fp32 on "
            "the slide's own tiles (checked every run), else fp32; int8: the CPU path, same check"
        ),
    )
    p.add_argument("--batch-size", type=int, default=64, help="tiles per batch (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="reader threads (default: 2)")
    p.add_argument("--fp16", action="store_true", help="store features as float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument(
        "--no-reuse", action="store_true", help="recompute even if a matching file exists"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="recompute every slide and replace its file, also one made with other settings "
        "(tissue detector, min tissue ...) or in another precision",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class _CohortBar:
    """One bar over slides; its postfix counts the tiles of the slides running now.

    The bar appears once the run is planned (after the encoder was resolved), so an
    error before that stays one line.
    """

    def __init__(self, total: int, *, disable: bool) -> None:
        self.total = total
        self.disable = disable
        self.bar: Any = None
        self.running: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()

    def start(self, _plan: object = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total, desc="embed", unit="slide", file=sys.stderr, disable=self.disable
        )

    def write(self, line: str, *, file: Any) -> None:
        if self.bar is None:
            print(line, file=file)
        else:
            self.bar.write(line, file=file)

    def tiles(self, slide: str, done: int, total: int) -> None:
        with self.lock:
            self.running[slide] = (done, total)
            self._postfix()

    def slide_done(self, slide: str) -> None:
        with self.lock:
            self.running.pop(slide, None)
            if self.bar is not None:
                self.bar.update(1)
            self._postfix()

    def _postfix(self) -> None:
        done = sum(d for d, _ in self.running.values())
        total = sum(t for _, t in self.running.values())
        n = len(self.running)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{done}/{total} tiles in {n} running" if n else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    """Embed the slides; returns 0 when all worked, 1 when any failed."""
    from gpfm_core.cohort import EmbedSettings, read_cohort_inputs, run_cohort
    from gpfm_core.cohort.run import quiet_no_tissue

    if args.retries < 0:
        raise GpfmError(f"--retries must be >= 0, not {args.retries}")
    entries = read_cohort_inputs(args.slides, mpp=args.slide_mpp)
    settings = EmbedSettings(
        # absolute paths: cluster workers may run in another folder
        encoder=os.path.abspath(args.encoder) if os.path.exists(args.encoder) else args.encoder,
        weights=os.path.abspath(args.weights) if args.weights else None,
        mpp=args.mpp,
        tile_px=args.tile_px,
        overlap_px=args.overlap,
        min_tissue=args.min_tissue,
        tissue_options=tissue_options(args),
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        dtype="float16" if args.fp16 else "float32",
        compile=args.compile,
        reuse=not args.no_reuse,
        force=args.force,
        quiet_empty=True,  # an empty slide is one line below: "0 tiles (no tissue)"
    )
    executor = args.scheduler or args.cluster or "inline"
    if args.cluster:
        from gpfm_core.cohort.distributed import parse_local

        parse_local(args.cluster)  # a bad local:N is one line before anything starts
    bar = _CohortBar(len(entries), disable=args.quiet)

    def on_result(r: Any) -> None:
        bar.slide_done(r.slide_id)
        if r.status == "failed":
            tries = f" (after {r.attempts} tries)" if r.attempts > 1 else ""
            bar.write(f"FAILED {r.slide_path}: {r.error}{tries}", file=sys.stderr)
            return
        if r.status in ("skipped", "reused"):
            how = "reused existing file"
        else:
            how = f"{r.n_tiles / max(r.seconds, 1e-9):.1f} tiles/s"
        if r.n_tiles == 0:  # skipped rows carry no note; 0 tiles means the same there
            line = (
                f"{r.slide_path} -> {r.file}: 0 tiles ({r.note or 'no tissue'}); "
                "lower --min-tissue or check the slide"
            )
            bar.write(line, file=sys.stdout)
            return
        prec = f" [{r.precision}]" if r.precision else ""
        bar.write(f"{r.slide_path} -> {r.file} ({r.n_tiles} tiles, {how}){prec}", file=sys.stdout)

    def on_dashboard(link: str | None) -> None:
        if link:
            bar.write(f"dask dashboard: {link}", file=sys.stderr)

    try:
        with quiet_no_tissue():  # an empty slide is its own one line (on_result)
            result = run_cohort(
                entries,
                out_dir=args.out,
                settings=settings,
                executor=executor,
                retries=args.retries,
                report_path=args.report,
                progress=bar.tiles,
                on_result=on_result,
                on_dashboard=on_dashboard,
                on_plan=bar.start,
                index=_wants_index(args, entries),
            )
    finally:
        bar.close()
    counts = ", ".join(
        f"{n} {status}"
        for status in ("embedded", "reused", "skipped", "failed", "cancelled")
        if (n := result.count(status))
    )
    if empty := sum(r.ok and r.n_tiles == 0 for r in result.reports):
        counts += f" ({empty} with 0 tiles: no tissue)"
    print(
        f"encoder: {result.encoder} (weights {result.weights_hash[:16]}) via {result.executor}; "
        f"slides: {counts or 'none'}"
    )
    if result.report_path is not None:
        print(f"report: {result.report_path}")
    for index_dir, up in result.indexes.items():
        parts = [f"{len(v)} {k}" for k in ("added", "replaced", "removed") if (v := getattr(up, k))]
        print(
            f"index: {index_dir} ({', '.join(parts) or 'unchanged'}; "
            f"{up.n_slides} slides, {up.n_tiles} tiles)"
        )
    for index_dir, error in result.index_errors.items():
        print(
            f"gpfm embed: index {index_dir} not updated: {error} "
            f"(gpfm index add {index_dir.parent} retries)",
            file=sys.stderr,
        )
    failed = result.failed
    if failed:
        print(
            f"gpfm embed: {len(failed)} of {len(result.reports)} slide(s) failed: "
            + ", ".join(r.slide_id for r in failed[:10])
            + (" ..." if len(failed) > 10 else ""),
            file=sys.stderr,
        )
        return 1
    return 1 if result.index_errors else 0


def _wants_index(args: argparse.Namespace, entries: list[Any]) -> bool:
    """--index / --no-index, else on for a cohort: a manifest, a glob, several slides, a
    cluster (one slide embedded by hand leaves its folder as it was)."""
    if args.index is not None:
        return bool(args.index)
    cohortish = any(s.lower().endswith(".csv") or any(c in s for c in "*?[") for s in args.slides)
    return cohortish or len(entries) > 1 or bool(args.cluster or args.scheduler)
