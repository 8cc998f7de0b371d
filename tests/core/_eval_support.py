"""Shared fixtures of the evaluation tests (``pytest_plugins = ["_eval_support"]``).

The demo data of :mod:`gpfm_core.evaluation.demo` (tile task crops, 40 generated slides and
their features for ``hed-texture`` and the shipped ``gpfm-student``) is generated once per
test session from the two sample images.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

ENCODERS = ("hed-texture", "gpfm-student")


@pytest.fixture(scope="session")
def eval_demo(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """:class:`~gpfm_core.evaluation.demo.DemoData` of the default demo (seed 0, 40 slides)."""
    from gpfm_core.evaluation import make_demo_data

    root = tmp_path_factory.mktemp("eval-demo") / "data"
    return make_demo_data(
        root,
        encoders=ENCODERS,
        sources={
            "skin": data_dir / "cmu_small_region.svs",
            "carcinoma": data_dir / "he_patch_1000.png",
        },
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def tile_truth(demo) -> dict[str, np.ndarray]:
    """Slide id -> (N,) bool, True where the tile (in features-file order) is carcinoma."""
    out: dict[str, list[bool]] = {}
    for r in read_csv(demo.tile_truth):
        out.setdefault(r["slide_id"], []).append(r["tissue"] == "carcinoma")
    return {k: np.array(v) for k, v in out.items()}
