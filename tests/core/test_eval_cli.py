"""``gpfm eval`` and ``gpfm train-mil`` end to end on the demo data (real encoders, ABMIL).

The report of ``gpfm eval demo --encoders gpfm-student,hed-texture`` is made once; the
learning checks of issue 13 read it: ABMIL AUROC >= 0.9 on the carcinoma-share
task, c-index >= 0.7 on its survival twin, and the top-attended tile of the high-share
slides is a carcinoma tile in >= 80 % of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _eval_support import read_csv, tile_truth
from PIL import Image

from gpfm_core.cli import main
from gpfm_core.embed import load_embeddings
from gpfm_core.evaluation import SlideModel, apply_slide_model

pytest_plugins = ["_eval_support"]


@pytest.fixture(scope="module")
def report(eval_demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval-report")
    rc = main(
        ["eval", "demo", "--data", str(eval_demo.root), "--encoders", "gpfm-student,hed-texture",
         "--out", str(out), "--bootstrap", "200"]
    )  # fmt: skip
    assert rc == 0
    return out


def _results(report: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """Rows by (task, encoder, protocol, metric)."""
    return {
        (r["task"], r["encoder"], r["protocol"], r["metric"]): r
        for r in read_csv(report / "results.csv")
    }


def test_the_report_has_tables_ranks_plots_and_provenance(report: Path) -> None:
    res = _results(report)
    for enc in ("gpfm-student", "hed-texture"):
        for m in ("balanced_accuracy", "f1_macro", "auroc_macro"):
            r = res[("carcinoma-share", enc, "abmil", m)]
            assert r["n_folds"] == "5" and r["n_test"] == "40" and float(r["sd"]) >= 0
        assert ("carcinoma-share-survival", enc, "abmil", "c_index") in res
        for m in ("balanced_accuracy", "f1_macro", "auroc_macro"):
            r = res[("tissue-tiles", enc, "linear", m)]
            assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"])
    assert json.loads((report / "results.json").read_text())[0]["task"] == "tissue-tiles"
    ranks = read_csv(report / "ranks.csv")
    assert {r["encoder"] for r in ranks} == {"gpfm-student", "hed-texture"}
    assert all(1.0 <= float(r["average_rank"]) <= 2.0 for r in ranks)
    assert all(r["tasks_ranked"] == "3" for r in ranks)
    for name in (
        "roc_tissue-tiles.png", "roc_carcinoma-share.png", "km_carcinoma-share-survival.png", "ranks.png"
    ):  # fmt: skip
        with Image.open(report / "plots" / name) as im:
            assert im.format == "PNG" and im.width >= 300 and im.height >= 250
    run = json.loads((report / "run.json").read_text())
    assert run["errors"] == [] and run["seeds"]["seed"] == 0
    assert run["seeds"]["bootstrap_resamples"] == 200
    assert {"torch", "numpy", "scikit-learn", "lifelines", "napari-gpfm"} <= set(run["versions"])
    from gpfm_core.encoders import create_encoder

    student_hash = create_encoder("gpfm-student").weights_hash
    encs = {(e["task"], e["encoder"]): e for e in run["encoders"]}
    e = encs[("carcinoma-share", "gpfm-student")]
    assert e["weights_hash"] == student_hash and e["embed_dim"] == 192
    assert e["tiling"]["requested_mpp"] == 0.5 and e["tiling"]["tile_px"] == 224
    assert (
        res[("carcinoma-share", "gpfm-student", "abmil", "auroc_macro")]["weights_hash"]
        == student_hash
    )


def test_saved_slide_models_apply_to_a_slide(report: Path, eval_demo) -> None:
    models = sorted(
        (report / "models" / "carcinoma-share" / "gpfm-student").glob("fold*.safetensors")
    )
    assert len(models) == 5
    m = SlideModel.load(models[0])
    assert m.task == "classification" and m.class_names == ["low", "high"]
    assert m.encoder == "gpfm-student" and m.tiling["tile_px"] == 224
    assert m.training["fold"] == 0 and m.training["task"] == "carcinoma-share"
    feats = load_embeddings(eval_demo.features["gpfm-student"] / "demo_slide_00.h5").features
    out = apply_slide_model(m, feats)
    assert out.attention.shape == (64,) and out.probabilities.sum() == pytest.approx(1, abs=1e-5)
    s = SlideModel.load(
        report / "models" / "carcinoma-share-survival" / "hed-texture" / "fold3.safetensors"
    )
    assert s.task == "survival" and len(s.bin_edges) == 5


@pytest.mark.parametrize("encoder", ["gpfm-student", "hed-texture"])
def test_abmil_learns_the_carcinoma_share(report: Path, encoder: str) -> None:
    res = _results(report)
    assert float(res[("carcinoma-share", encoder, "abmil", "auroc_macro")]["value"]) >= 0.9
    assert float(res[("carcinoma-share-survival", encoder, "abmil", "c_index")]["value"]) >= 0.7


def test_attention_points_at_the_carcinoma(report: Path, eval_demo) -> None:
    truth = tile_truth(eval_demo)
    preds = read_csv(report / "predictions" / "carcinoma-share__gpfm-student.csv")
    high = [p for p in preds if p["label"] == "high"]
    assert len(high) == 20
    hits = [bool(truth[p["slide_id"]][int(p["top_tile"])]) for p in high]
    assert np.mean(hits) >= 0.8


def test_a_failing_encoder_is_reported_and_the_rest_is_kept(
    eval_demo, tmp_path: Path, capsys
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: small\ntasks:\n"
        f"  - name: share\n    type: slide\n    items: {eval_demo.slides_csv}\n"
        f"    features: {eval_demo.root}/features/{{encoder}}\n"
        "    splits: {folds: 3}\n    abmil: {max_epochs: 2, min_epochs: 1}\n"
    )
    rc = main(
        [
            "eval",
            str(spec),
            "--encoders",
            "hed-texture,no-such-encoder",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 task run(s) failed" in err
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert [e["encoder"] for e in run["errors"]] == ["no-such-encoder"]
    assert (
        "no-such-encoder" in run["errors"][0]["error"] and "gpfm embed" in run["errors"][0]["error"]
    )
    assert {r["encoder"] for r in read_csv(tmp_path / "r" / "results.csv")} == {"hed-texture"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "nope.yaml", "--encoders", "hed-texture"], "not found"),
        (["train-mil", "nope.csv", "--features", ".", "--out", "m"], "not found"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, capsys, argv: list[str], message: str, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_train_mil_saves_a_model(eval_demo, tmp_path: Path, capsys, task: str) -> None:
    out = tmp_path / "model"
    rc = main(
        ["train-mil", str(eval_demo.slides_csv), "--features", str(eval_demo.features["hed-texture"]),
         "--out", str(out), "--task", task, "--classes", "low,high", "--epochs", "4", "--patience", "2"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "model: " in text and "val: " in text
    m = SlideModel.load(tmp_path / "model.safetensors", embed_dim=96)
    assert m.task == task and m.encoder == "hed-texture" and m.training["n_val"] == 8
    assert m.training["epochs"] <= 4
