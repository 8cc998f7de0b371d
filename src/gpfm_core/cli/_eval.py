"""``gpfm eval SPEC --encoders a,b`` and ``gpfm train-mil ITEMS.csv --features DIR``.

``gpfm eval`` runs the GPFM paper's protocols (tile: linear probe, kNN, few-shot, retrieval;
slide: ABMIL classification and survival) for several encoders on the tasks of a YAML spec
and writes one report folder (tables, average ranks, plots, provenance). ``gpfm train-mil``
trains one ABMIL slide model and saves it as ``.safetensors`` (weights + JSON config).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EVAL_HELP = """\
SPEC is a YAML task spec (see the README, "Evaluating encoders"), or 'demo' for the packaged
demo tasks, whose data is generated from the sample images (GPFM_DATA_DIR) into --data.
Slide tasks read per-slide feature files (<slide>.h5 under the task's features folder, one
folder per encoder: gpfm embed SLIDES --encoder NAME --out features/NAME). The report folder
gets results.csv/json, ranks.csv/json, run.json (encoders, weights hashes, tiling, seeds,
versions) and plots/. Exit status 1 when any task failed for any encoder.
"""

TRAIN_MIL_HELP = """\
ITEMS.csv: slide_id,label (classification) or slide_id,survival_months,censorship (survival,
1 = censored), with an optional split column (train / val / test). Without one, --val-fraction
of the slides (stratified) validates the early stopping. The model file (.safetensors:
weights + JSON config, no pickle) loads with gpfm_core.evaluation.SlideModel.load and applies
to a slide's features with apply_slide_model.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm eval``."""
    p = subparsers.add_parser(
        "eval",
        help="compare encoders on tile and slide tasks (the GPFM paper's protocols)",
        description=EVAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC", help="task spec YAML, or 'demo'")
    p.add_argument(
        "--encoders", required=True, help="comma-separated encoder names or checkpoint paths"
    )
    p.add_argument("--out", default="eval_report", help="report folder (default: %(default)s)")
    p.add_argument("--data", default=None, help="demo data folder (default: <out>/demo_data)")
    p.add_argument("--tasks", default=None, help="comma-separated task names to run (default: all)")
    p.add_argument("--seed", type=int, default=None, help="override the spec's seed")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=None,
        help="bootstrap resamples (default: the spec's, 1000)",
    )
    p.add_argument(
        "--device", default="auto", help="where tile images are embedded (auto, cpu, cuda)"
    )
    return p


def _split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; print one line per task x encoder and where the report is."""
    from gpfm_core.evaluation import load_spec, run_evaluation
    from gpfm_core.evaluation.demo import demo_spec_path, make_demo_data

    encoders = _split_list(args.encoders) or []
    out = Path(args.out)
    if args.spec == "demo":
        spec = load_spec(demo_spec_path(), root=Path(args.data) if args.data else out / "demo_data")
    else:
        spec = load_spec(args.spec, root=args.data)
    if spec.data == "demo":
        print(f"demo data in {spec.root} (generated on first use)", flush=True)
        make_demo_data(spec.root, encoders=encoders, seed=0)
    report = run_evaluation(
        spec,
        encoders,
        out=out,
        device=args.device,
        seed=args.seed,
        bootstrap=args.bootstrap,
        tasks=_split_list(args.tasks),
        progress=lambda msg: print(msg, flush=True),
        command=["gpfm", *sys.argv[1:]],
    )
    print(
        f"report: {report.out} ({len(report.rows)} results; ranks in {report.written['ranks_csv'].name})"
    )
    if report.errors:
        print(f"gpfm eval: {len(report.errors)} task run(s) failed (see run.json)", file=sys.stderr)
        return 1
    return 0
