"""The embedding pipeline on the real CMU slide with the real tiny-vit encoder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gpfm_core.embed import (
    EmbedCancelled,
    EmbeddingsClashError,
    NoTissueWarning,
    embed_slide,
    embed_slides,
    iter_embed_slide,
    load_embeddings,
)
from gpfm_core.embed.layout import features_dir, stale_temps
from gpfm_core.encoders import create_encoder, preprocess
from gpfm_core.errors import EncoderError, GpfmError
from gpfm_core.slide import open_slide
from gpfm_core.tiling import make_tile_grid, read_tiles
from gpfm_core.tissue import TissueMask

MPP = 2.0  # tiny-vit reads 112 px tiles: ~24 tiles on the CMU sample at 2 µm/px


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return create_encoder("tiny-vit", device="cpu")


def _cmu_file(out: Path, enc: torch.nn.Module | None = None, mpp: float = MPP) -> Path:
    """Where the CMU sample's tiny-vit file lies (TRIDENT's layout, gpfm_core.embed.layout)."""
    wh = enc.weights_hash if enc is not None else create_encoder("tiny-vit").weights_hash
    folder = features_dir(out, encoder="tiny-vit", weights_hash=wh, mpp=mpp, tile_px=112)
    return folder / "cmu_small_region.h5"


def _forwards(enc: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    enc.register_forward_hook(lambda _m, inp, _out: calls.append(int(inp[0].shape[0])))
    return calls


def test_features_equal_direct_forward(
    cmu_svs: Path, tmp_path: Path, tiny: torch.nn.Module
) -> None:
    path = embed_slide(
        cmu_svs,
        encoder=tiny,
        out_dir=tmp_path,
        mpp=MPP,
        batch_size=5,
        workers=2,
        device="cpu",
        precision="fp32",  # exact: "auto" may run int8 on CPU (tests/core/test_cpu_int8.py)
    )
    assert path == _cmu_file(tmp_path, tiny)
    assert path.relative_to(tmp_path).parts[:2] == (
        "2mpp_112px_0px_overlap",
        f"features_tiny-vit-{path.parent.name[-8:]}",
    )
    emb = load_embeddings(path)
    with open_slide(cmu_svs) as slide:
        grid = make_tile_grid(slide, mpp=MPP, tile_px=112, min_tissue=0.25)
        assert len(grid) > 5
        np.testing.assert_array_equal(emb.coords, grid.coords)
        np.testing.assert_array_equal(emb.grid_rc, grid.grid_rc)
        idx = np.array([0, len(grid) // 2, len(grid) - 1])
        tiles = read_tiles(slide, grid, idx)
        info = slide.info
    with torch.inference_mode():
        direct = tiny(preprocess(tiles, tiny.meta)).numpy()
    # batched run vs a direct forward of a few tiles: float32 GEMMs of other shapes round
    # differently (machine-dependent); a wrong tile would differ by O(1)
    np.testing.assert_allclose(emb.features[idx], direct, rtol=0, atol=1e-4 * np.abs(direct).max())
    a = emb.attrs
    assert a["encoder"] == "tiny-vit" and a["weights_hash"] == tiny.weights_hash
    assert a["requested_mpp"] == MPP and a["effective_mpp"] == pytest.approx(grid.effective_mpp)
    assert a["tile_px"] == 112 and a["patch_size"] == 112 and a["overlap"] == 0
    assert a["patch_size_level0"] == grid.tile_size_level0 == a["tile_size_level0"]
    assert (
        a["slide_id"] == info.slide_id and a["level0_width"] == 2220 and a["level0_height"] == 2967
    )
    assert a["level0_magnification"] == 20 and a["target_magnification"] == 5
    assert (a["grid_rows"], a["grid_cols"]) == grid.grid_shape and a["n_tiles"] == len(grid)
    assert (
        a["gpfm_core_version"] and a["created"].endswith("Z") and a["compute_precision"] == "fp32"
    )


def test_progress_covers_every_tile_once(
    cmu_svs: Path, tmp_path: Path, tiny: torch.nn.Module
) -> None:
    gen = iter_embed_slide(
        cmu_svs, encoder=tiny, out_dir=tmp_path, mpp=MPP, batch_size=4, device="cpu"
    )
    events = []
    while True:
        try:
            events.append(next(gen))
            assert not torch.is_inference_mode_enabled()  # no torch state leaks across yields
        except StopIteration as stop:
            result = stop.value
            break
    total = events[0].total
    seen = np.concatenate([e.indices for e in events])
    assert sorted(seen.tolist()) == list(range(total))
    assert [e.done for e in events] == sorted({e.done for e in events}) and events[-1].done == total
    assert all(
        e.features.shape == (len(e.indices), 64) and e.features.dtype == np.float32 for e in events
    )
    # every event carries the one grid being embedded, matching the file's coords
    assert all(e.grid is events[0].grid for e in events) and len(events[0].grid) == total
    with h5py.File(result.path) as f:
        np.testing.assert_array_equal(f["coords"][:], events[0].grid.coords)
    emb = load_embeddings(result.path)
    np.testing.assert_array_equal(emb.features[events[1].indices], events[1].features)
    assert result.n_tiles == total and not result.reused and result.encoder == "tiny-vit"


def test_reuse_does_no_forward(cmu_svs: Path, tmp_path: Path) -> None:
    enc = create_encoder("tiny-vit", device="cpu")
    calls = _forwards(enc)
    first = embed_slide(cmu_svs, encoder=enc, out_dir=tmp_path, mpp=MPP, device="cpu")
    n_calls, mtime = len(calls), first.stat().st_mtime_ns
    assert n_calls > 0
    gen = iter_embed_slide(cmu_svs, encoder=enc, out_dir=tmp_path, mpp=MPP, device="cpu")
    with pytest.raises(StopIteration) as stop:
        next(gen)  # reused: no progress events at all
    assert stop.value.value.reused and stop.value.value.path == first
    assert len(calls) == n_calls and first.stat().st_mtime_ns == mtime
    embed_slide(cmu_svs, encoder=enc, out_dir=tmp_path, mpp=MPP, device="cpu", reuse=False)
    assert len(calls) == 2 * n_calls
    # a second tiling into the same folder: a second file, the first one untouched
    second = embed_slide(cmu_svs, encoder=enc, out_dir=tmp_path, mpp=MPP * 1.5, device="cpu")
    assert len(calls) > 2 * n_calls and second == _cmu_file(tmp_path, enc, MPP * 1.5) != first
    assert load_embeddings(first).attrs["requested_mpp"] == MPP
    assert load_embeddings(second).attrs["requested_mpp"] == MPP * 1.5


def test_cancel_and_close_leave_no_file(
    cmu_svs: Path, tmp_path: Path, tiny: torch.nn.Module
) -> None:
    cancel = threading.Event()
    gen = iter_embed_slide(
        cmu_svs, encoder=tiny, out_dir=tmp_path, mpp=MPP, batch_size=4, cancel=cancel
    )
    first = next(gen)
    final = _cmu_file(tmp_path, tiny)
    assert first.done == 4 and len(stale_temps(final)) == 1  # the writer's temporary file
    cancel.set()
    with pytest.raises(EmbedCancelled, match="cancelled; no file written"):
        next(gen)
    assert sorted(final.parent.iterdir()) == [final.parent / ".locks"]
    gen = iter_embed_slide(cmu_svs, encoder=tiny, out_dir=tmp_path, mpp=MPP, batch_size=4)
    next(gen)
    gen.close()  # what napari's worker.quit() does
    assert sorted(final.parent.iterdir()) == [final.parent / ".locks"]


def test_killed_run_leaves_no_h5_and_rerun_is_clean(cmu_svs: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from gpfm_core.embed import embed_slide;"
        "embed_slide(sys.argv[1], encoder='tiny-vit', out_dir=sys.argv[2], mpp=0.5, tissue=False, batch_size=2, device='cpu')"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(cmu_svs), str(tmp_path)], env=env)
    final = features_dir(
        tmp_path,
        encoder="tiny-vit",
        weights_hash=create_encoder("tiny-vit").weights_hash,
        mpp=0.5,
        tile_px=112,
    ) / ("cmu_small_region.h5")
    try:
        deadline = time.monotonic() + 120
        while not stale_temps(final) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # ~500 tiles two at a time: the run lasts seconds
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (left,) = stale_temps(final)  # the killed writer's temporary file, and no .h5
    assert not final.exists()
    # the rerun is neither blocked (the OS released the dead writer's lock) nor confused
    path = embed_slide(
        cmu_svs, encoder="tiny-vit", out_dir=tmp_path, mpp=0.5, tissue=False, device="cpu"
    )
    assert path == final and not left.exists() and stale_temps(final) == []
    assert len(load_embeddings(final)) > 0


def test_no_tissue_writes_empty_file_and_warns(
    cmu_svs: Path, tmp_path: Path, tiny: torch.nn.Module
) -> None:
    empty = TissueMask.from_array(np.zeros((30, 22), np.uint8), level0_size=(2220, 2967))
    with pytest.warns(NoTissueWarning, match="no tile has >= 0.25 tissue"):
        path = embed_slide(cmu_svs, encoder=tiny, out_dir=tmp_path, mpp=MPP, tissue=empty)
    with h5py.File(path, "r") as f:
        assert f["features"].shape == (0, 64) and f["coords"].shape == (0, 2)
    assert load_embeddings(path).attrs["tissue_source"].startswith("mask:")


def test_user_mask_selects_tiles_and_is_part_of_reuse_key(
    cmu_svs: Path, tmp_path: Path, tiny: torch.nn.Module
) -> None:
    left = np.zeros((30, 22), np.uint8)
    left[:, :11] = 1  # the left half of the slide
    mask = TissueMask.from_array(left, level0_size=(2220, 2967))
    emb = load_embeddings(
        embed_slide(cmu_svs, encoder=tiny, out_dir=tmp_path, mpp=MPP, tissue=mask)
    )
    tile0 = emb.attrs["tile_size_level0"]
    # kept tiles have >= 25 % of their width left of x = 1110
    assert len(emb) > 0 and np.all(emb.coords[:, 0] + tile0 * 0.25 <= 1110 + 1)
    # another mask for the same file: never reused, never replaced without force
    with pytest.raises(EmbeddingsClashError) as clash:
        embed_slide(cmu_svs, encoder=tiny, out_dir=tmp_path, mpp=MPP, tissue=False)
    msg = str(clash.value)
    assert "\n" not in msg and str(cmu_svs) in msg and str(emb.path) in msg
    assert "tissue_source mask:" in msg and "none here" in msg and "force" in msg
    assert load_embeddings(emb.path).attrs["tissue_source"].startswith("mask:")  # untouched
    everything = load_embeddings(
        embed_slide(cmu_svs, encoder=tiny, out_dir=tmp_path, mpp=MPP, tissue=False, force=True)
    )
    assert everything.path == emb.path and everything.attrs["tissue_source"] == "none"
    assert np.any(everything.coords[:, 0] > 1110)


def test_float16_storage(cmu_svs: Path, tmp_path: Path, tiny: torch.nn.Module) -> None:
    path = embed_slide(cmu_svs, encoder=tiny, out_dir=tmp_path, mpp=MPP, dtype="float16")
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float16


def test_bad_options_fail_before_any_work(cmu_svs: Path, tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="tiny-vit"):  # the message lists the known names
        embed_slide(cmu_svs, encoder="no-such-encoder", out_dir=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(GpfmError, match="CUDA is not available"):
            embed_slide(cmu_svs, encoder="tiny-vit", out_dir=tmp_path, device="cuda")
    with pytest.raises(GpfmError, match="float16"):
        embed_slide(cmu_svs, encoder="tiny-vit", out_dir=tmp_path, dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_embed_slides_continues_after_a_bad_slide(
    cmu_svs: Path, tmp_path: Path, tiny: torch.nn.Module
) -> None:
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"")
    seen: list[str] = []
    outcomes = embed_slides(
        [bad, cmu_svs],
        encoder=tiny,
        out_dir=tmp_path / "out",
        mpp=MPP,
        device="cpu",
        on_result=lambda o: seen.append(o.slide.name),
    )
    assert [o.ok for o in outcomes] == [False, True] and seen == ["broken.svs", cmu_svs.name]
    assert "empty" in (outcomes[0].error or "") and "\n" not in (outcomes[0].error or "")
    assert outcomes[1].result is not None and outcomes[1].result.path.is_file()
    assert [p.name for p in (tmp_path / "out").rglob("*.h5")] == ["cmu_small_region.h5"]
