"""Evaluation as in the GPFM paper: tile protocols, slide-level ABMIL, reports, demo data.

>>> from gpfm_core.evaluation import run_evaluation
>>> report = run_evaluation("tasks.yaml", ["gpfm", "uni"], out="eval_report")  # doctest: +SKIP

* :mod:`~gpfm_core.evaluation.spec` — YAML task specs with CSVs of items and splits.
* :mod:`~gpfm_core.evaluation.tile` — linear probe, kNN, few-shot, retrieval on frozen features.
* :mod:`~gpfm_core.evaluation.mil` — ABMIL (classification, survival), the saved
  :class:`SlideModel` (safetensors + JSON) and :func:`apply_slide_model`.
* :mod:`~gpfm_core.evaluation.metrics` — scikit-learn / lifelines metrics with bootstrap CIs.
* :mod:`~gpfm_core.evaluation.report` — tables, average ranks, plots, provenance.
* :mod:`~gpfm_core.evaluation.demo` — demo tasks generated from the sample images.

Importing this package loads numpy only; torch, scikit-learn, lifelines and matplotlib are
imported by the functions that use them.
"""

from __future__ import annotations

from gpfm_core.evaluation.demo import DemoData, demo_spec_path, make_demo_data
from gpfm_core.evaluation.metrics import (
    Estimate,
    classification_metrics,
    classification_with_ci,
    concordance,
    concordance_with_ci,
)
from gpfm_core.evaluation.mil import (
    MILConfig,
    SlideBags,
    SlideModel,
    SlideOutput,
    apply_slide_model,
    build_abmil,
    train_abmil,
)
from gpfm_core.evaluation.runner import (
    EvalReport,
    TaskOutcome,
    run_evaluation,
    run_slide_task,
    run_tile_task,
    train_slide_model,
)
from gpfm_core.evaluation.spec import EvalSpec, TaskSpec, load_spec
from gpfm_core.evaluation.tile import LinearProbeConfig, run_tile_protocols

__all__ = [
    "DemoData",
    "Estimate",
    "EvalReport",
    "EvalSpec",
    "LinearProbeConfig",
    "MILConfig",
    "SlideBags",
    "SlideModel",
    "SlideOutput",
    "TaskOutcome",
    "TaskSpec",
    "apply_slide_model",
    "build_abmil",
    "classification_metrics",
    "classification_with_ci",
    "concordance",
    "concordance_with_ci",
    "demo_spec_path",
    "load_spec",
    "make_demo_data",
    "run_evaluation",
    "run_slide_task",
    "run_tile_protocols",
    "run_tile_task",
    "train_abmil",
    "train_slide_model",
]
