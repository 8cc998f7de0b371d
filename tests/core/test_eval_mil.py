"""ABMIL slide models: the network, training, the saved file and the apply function."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from scipy.stats import spearmanr

from gpfm_core.embed.device import PrecisionFallbackWarning
from gpfm_core.errors import GpfmError
from gpfm_core.evaluation.mil import (
    MILConfig,
    SlideBags,
    SlideModel,
    _fold_standardiser,
    apply_slide_model,
    build_abmil,
    iter_apply_slide_model,
    train_abmil,
)

D = 24


def _bags(n: int = 24, *, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Bags of 30-50 tiles: 'signal' tiles (a shifted cluster) make up 30-50 % of positives."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=D) * 2
    bags, labels, truth = [], [], []
    for i in range(n):
        m = int(rng.integers(30, 51))
        pos = i % 2
        k = int(m * rng.uniform(0.3, 0.5)) if pos else int(m * rng.uniform(0.0, 0.1))
        x = rng.normal(size=(m, D)).astype(np.float32) + 1.0  # an offset, as texture features have
        x[:k] += centre
        bags.append(x)
        labels.append(pos)
        truth.append(np.arange(m) < k)
    return bags, np.array(labels), truth


@pytest.fixture(scope="module")
def trained() -> tuple:
    bags, y, truth = _bags()
    idx = np.arange(len(bags))
    res = train_abmil(
        SlideBags(bags), task="classification", train=idx[:16], val=idx[16:20], evaluate=idx,
        labels=y, class_names=["neg", "pos"], config=MILConfig(hidden=32, attn_dim=16, max_epochs=15),
        seed=0, encoder="tiny", weights_hash="abc", tiling={"mpp": 0.5, "tile_px": 224},
    )  # fmt: skip
    return res, bags, y, truth


def _forward(model: SlideModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, a = model.module()(torch.from_numpy(x))
    return logits.numpy(), a.numpy()


def test_the_network_is_the_papers_abmil() -> None:
    net = build_abmil(1024, 3)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {
        "fc.0.weight": (512, 1024), "fc.0.bias": (512,),
        "attention.0.weight": (128, 512), "attention.0.bias": (128,),
        "attention.2.weight": (1, 128), "attention.2.bias": (1,),
        "classifier.weight": (3, 512), "classifier.bias": (3,),
    }  # fmt: skip
    assert isinstance(net.fc[1], torch.nn.ReLU) and net.fc[2].p == 0.25
    assert isinstance(net.attention[1], torch.nn.Tanh)


def test_dropout_is_active_in_training_only() -> None:
    net = build_abmil(D, 2, hidden=64, attn_dim=8)
    x = torch.randn(50, D)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x)[1], net(x)[1])
        net.train()
        assert not torch.equal(net(x)[1], net(x)[1])
        torch.manual_seed(0)
        h = torch.relu(net.first_layer(x))
        torch.manual_seed(0)
        kept = torch.rand_like(h) >= 0.25  # the mask forward draws after the same seed
        torch.manual_seed(0)
        a_train = net(x)[1]
        # the attention of the dropped-and-rescaled hidden units, by hand
        want = net.attention(h * kept / 0.75).squeeze(-1)
    assert torch.allclose(a_train, want, atol=1e-5)
    assert 0.7 < kept.float().mean() < 0.8


def test_training_learns_the_signal_tiles(trained) -> None:
    res, bags, y, truth = trained
    probs = np.array([res.outputs[i].probabilities[1] for i in range(len(bags))])
    assert probs[y == 1].min() > probs[y == 0].max()  # every slide ranked right
    top = [truth[i][np.argmax(res.outputs[i].attention)] for i in range(len(bags)) if y[i]]
    assert np.mean(top) == 1.0  # positives are decided by their signal tiles
    assert res.model.training["best_epoch"] >= 1
    assert [h["epoch"] for h in res.history] == list(range(1, len(res.history) + 1))


@pytest.mark.parametrize("chunk", [7, 50, 16384])
def test_apply_equals_the_network_forward(trained, chunk: int) -> None:
    res, bags, *_ = trained
    for x in bags[:4]:
        out = apply_slide_model(res.model, x, chunk=chunk)
        logits, a = _forward(res.model, x)
        p = np.exp(logits - logits.max())
        assert np.allclose(out.probabilities, p / p.sum(), atol=1e-6)
        assert np.allclose(out.attention, a, atol=1e-5)
        assert out.prediction == res.model.class_names[int(np.argmax(p))]
        assert out.risk is None


def test_training_standardises_then_folds_it_into_the_first_layer() -> None:
    rng = np.random.default_rng(1)
    net = build_abmil(D, 2, hidden=16, attn_dim=8)
    net.eval()
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    mean = rng.normal(size=D).astype(np.float32)
    inv = rng.uniform(0.2, 3, size=D).astype(np.float32)
    x = rng.normal(size=(40, D)).astype(np.float32) * 2 + 1
    with torch.no_grad():
        want = net(torch.from_numpy((x - mean) * inv))
        net.load_state_dict(
            {k: torch.from_numpy(v) for k, v in _fold_standardiser(state, mean, inv).items()}
        )
        got = net(torch.from_numpy(x))
    assert torch.allclose(want[0], got[0], atol=1e-5) and torch.allclose(want[1], got[1], atol=1e-4)


def test_saved_model_round_trips(trained, tmp_path: Path) -> None:
    res, bags, *_ = trained
    path = res.model.save(tmp_path / "sub" / "m.safetensors")
    back = SlideModel.load(path, embed_dim=D)
    assert back.config_dict() == res.model.config_dict()
    assert back.tiling == {"mpp": 0.5, "tile_px": 224} and back.encoder == "tiny"
    a, b = apply_slide_model(res.model, bags[0]), apply_slide_model(back, bags[0])
    assert np.array_equal(a.attention, b.attention) and np.array_equal(
        a.probabilities, b.probabilities
    )


def test_survival_model_gives_risk_and_curves(tmp_path: Path) -> None:
    bags, y, _ = _bags(30, seed=2)
    rng = np.random.default_rng(3)
    t = np.where(y == 1, rng.uniform(5, 30, y.size), rng.uniform(25, 80, y.size))
    c = (rng.random(y.size) < 0.25).astype(int)
    idx = np.arange(y.size)
    res = train_abmil(
        SlideBags(bags), task="survival", train=idx[:20], val=idx[20:25], evaluate=idx,
        time=t, censorship=c, config=MILConfig(hidden=32, attn_dim=16, max_epochs=15, n_bins=3),
    )  # fmt: skip
    out = res.outputs[0]
    assert out.probabilities is None and out.prediction is None
    assert out.hazards.shape == (3,) and np.all(np.diff(out.survival) <= 0)
    assert out.risk == pytest.approx(-float(out.survival.sum()), abs=1e-5)
    assert len(res.model.bin_edges) == 4
    risk = np.array([res.outputs[i].risk for i in idx])
    assert risk[y == 1].mean() > risk[y == 0].mean()  # short survivors get the higher risk
    back = SlideModel.load(res.model.save(tmp_path / "s.safetensors"))
    assert apply_slide_model(back, bags[3]).risk == pytest.approx(res.outputs[3].risk, abs=1e-6)


def test_bf16_apply_is_close_to_fp32(trained) -> None:
    res, bags, *_ = trained
    x = np.concatenate(bags[:6])
    a = apply_slide_model(res.model, x)
    b = apply_slide_model(res.model, x, precision="bf16")
    assert np.abs(a.probabilities - b.probabilities).max() < 0.02
    assert np.corrcoef(a.attention, b.attention)[0, 1] > 0.99


def test_apply_yields_its_progress_and_returns_the_answer(trained) -> None:
    res, bags, *_ = trained
    x = np.concatenate(bags[:6])
    gen = iter_apply_slide_model(res.model, x, chunk=50)
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            out = stop.value
            break
    n = x.shape[0]
    assert steps == [(min(s + 50, n), n) for s in range(0, n, 50)]
    ref = apply_slide_model(res.model, x, chunk=50)
    assert np.array_equal(out.attention, ref.attention) and out.prediction == ref.prediction
    assert not torch.is_inference_mode_enabled()  # never left on across a yield


def test_int8_apply_is_faithful_and_says_why(trained) -> None:
    res, bags, *_ = trained
    for x in (np.concatenate(bags[:6]), bags[1], bags[2]):
        ref = apply_slide_model(res.model, x)
        q = apply_slide_model(res.model, x, precision="int8")
        assert q.precision == "int8" and q.check.startswith("int8: attention rank correlation")
        assert q.prediction == ref.prediction
        assert np.abs(q.probabilities - ref.probabilities).max() <= 0.02
        assert spearmanr(q.attention, ref.attention)[0] >= 0.99
        assert np.abs(q.attention - ref.attention).max() > 1e-6  # really int8, not fp32 again


def test_int8_that_is_not_faithful_falls_back_to_fp32(trained) -> None:
    """One huge first-layer weight on a feature that is always 0: fp32 ignores it, but
    per-tensor int8 rounds every other weight to 0 or one step (an outlier weight: the kind
    of model where int8 is known to break)."""
    res, bags, *_ = trained
    state = {k: v.copy() for k, v in res.model.state.items()}
    state["fc.0.weight"][0, 0] = 1e4 * np.abs(state["fc.0.weight"]).max()
    model = replace(res.model, state=state, _module=None)
    x = np.concatenate(bags[:6])
    x[:, 0] = 0.0
    with pytest.warns(PrecisionFallbackWarning, match="not faithful"):
        q = apply_slide_model(model, x, precision="int8")
    ref = apply_slide_model(model, x)
    assert q.precision == "fp32" and q.check.startswith("fp32 fallback")
    assert np.array_equal(q.attention, ref.attention)


@pytest.mark.parametrize(("work", "want"), [(None, "fp32"), (1000, "int8")])
def test_auto_precision_uses_int8_for_large_slides_only(
    trained, monkeypatch: pytest.MonkeyPatch, work: int | None, want: str
) -> None:
    from gpfm_core.evaluation import mil

    res, bags, *_ = trained
    if work is not None:  # a "large" slide without allocating one
        monkeypatch.setattr(mil, "INT8_AUTO_WORK", work)
    x = np.concatenate(bags[:6])
    assert x.size < mil.INT8_AUTO_WORK or work is not None
    out = apply_slide_model(res.model, x, precision="auto")
    assert out.precision == want
    assert out.check.startswith("fp32: a small slide" if want == "fp32" else "int8: ")


def test_int8_is_refused_on_a_gpu_before_touching_it(trained) -> None:
    res, bags, *_ = trained
    with pytest.raises(GpfmError, match="CPU only"):
        apply_slide_model(res.model, bags[0], precision="int8", device="cuda")


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return json.loads(fh.metadata()["gpfm_slide_model"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "not found"),
        ("pickle", "not a gpfm slide model"),
        ("no-meta", "not a gpfm slide model"),
        ("foreign-format", "damaged or foreign"),
        ("wrong-shape", "damaged or foreign"),
        ("nan-weight", "damaged or foreign"),
        ("newer", "newer napari-gpfm"),
    ],
)
def test_bad_model_files_give_one_line(trained, tmp_path: Path, damage: str, message: str) -> None:
    res, *_ = trained
    good = res.model.save(tmp_path / "good.safetensors")
    path = tmp_path / "bad.safetensors"
    state = {k: v.copy() for k, v in res.model.state.items()}
    meta = _meta(good)
    if damage == "pickle":
        torch.save({"state": state}, path)
    elif damage == "no-meta":
        save_file(state, str(path))
    elif damage != "missing":
        if damage == "foreign-format":
            meta["format"] = "gpfm-linear-probe"
        elif damage == "wrong-shape":
            state["classifier.weight"] = np.zeros((3, 32), np.float32)
        elif damage == "nan-weight":
            state["fc.0.bias"][0] = np.nan
        elif damage == "newer":
            meta["format_version"] = 99
        save_file(state, str(path), metadata={"gpfm_slide_model": json.dumps(meta)})
    with pytest.raises(GpfmError, match=message) as err:
        SlideModel.load(path)
    assert "\n" not in str(err.value)


def test_apply_and_load_check_the_features(trained, tmp_path: Path) -> None:
    res, *_ = trained
    with pytest.raises(GpfmError, match="reads 24-d"):
        apply_slide_model(res.model, np.zeros((5, D + 1), np.float32))
    with pytest.raises(GpfmError, match="non-empty"):
        apply_slide_model(res.model, np.zeros((0, D), np.float32))
    x = np.zeros((5, D), np.float32)
    x[2, 3] = np.nan
    with pytest.raises(GpfmError, match="NaN"):
        apply_slide_model(res.model, x)
    with pytest.raises(GpfmError, match="precision"):
        apply_slide_model(res.model, x, precision="fp16")
    with pytest.raises(GpfmError, match="has 12-d"):
        SlideModel.load(res.model.save(tmp_path / "m.safetensors"), embed_dim=12)


def test_training_rejects_impossible_splits() -> None:
    bags, y, _ = _bags(12)
    b = SlideBags(bags)
    idx = np.arange(12)
    with pytest.raises(GpfmError, match="no training slide"):
        train_abmil(
            b,
            task="classification",
            train=idx[y == 0][:4],
            val=idx[6:8],
            labels=y,
            class_names=["a", "b"],
        )
    with pytest.raises(GpfmError, match="validation slides"):
        train_abmil(b, task="classification", train=idx, val=[], labels=y, class_names=["a", "b"])
    mixed = SlideBags([bags[0], np.zeros((3, 5), np.float32)])
    assert mixed.dim == D
    with pytest.raises(GpfmError, match="other slides have 24-d"):
        mixed[1]


def test_config_rejects_unknown_options() -> None:
    with pytest.raises(GpfmError, match="unknown ABMIL option"):
        MILConfig.from_dict({"hiden": 5})
    assert replace(MILConfig(), lr=1e-3).lr == 1e-3
