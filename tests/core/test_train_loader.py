"""Loading: worker processes build the same batches as the main process, slides open lazily
through a bounded LRU, and unreadable tiles (a corrupt region, a truncated or a missing slide)
are replaced, counted and logged, never fatal."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from gpfm_core.cli import main
from gpfm_core.synth import write_pyramid_tiff
from gpfm_core.train import load_config, train
from gpfm_core.train.augment import MultiCropAugment
from gpfm_core.train.data import SlideHandles, TileReadError, build_dataset, make_batch
from gpfm_core.train.loader import MicroBatches, iterate, make_loader
from gpfm_core.train.logging_csv import read_metrics
from gpfm_core.train.sampler import replacement_index, sample_indices

torch.set_num_threads(1)

TILE = 128  # level-0 px per tile (0.5 µm/px slides read at 0.5 µm/px)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> dict:
    """Four 1024 px slides of the same image, tiled (64 tiles each) and indexed; then damaged:
    ``bad`` has TIFF tile (0, 0) of levels 0 and 1 zeroed (a corrupt region), ``truncated`` lost
    the last 70 % of its bytes and ``missing`` was deleted."""
    import tifffile

    d = tmp_path_factory.mktemp("damaged")
    img = np.ascontiguousarray(cmu_rgb[:1024, :1024])
    slides = {}
    for name in ("bad", "good", "missing", "truncated"):
        slides[name] = write_pyramid_tiff(d / f"{name}.svs", img, mpp=0.5, factors=(1, 2), tile=256)
        argv = ["tiles", str(slides[name]), "--mpp", "0.5", "--tile-px", str(TILE), "--no-tissue"]
        assert main([*argv, "--out", str(d / "store")]) == 0
    (lists,) = {p.parent for p in (d / "store").rglob("*_patches.h5")}
    index = d / "cohort.tileindex"
    build_dataset({"tile_lists": [str(lists)], "tile_px": TILE, "mpp": 0.5}, index=index)
    with tifffile.TiffFile(slides["bad"]) as t:  # the first JPEG tile of both levels
        spans = [(pg.dataoffsets[0], pg.databytecounts[0]) for pg in t.pages[:2]]
    with open(slides["bad"], "r+b") as fh:
        for off, count in spans:
            fh.seek(off)
            fh.write(b"\0" * count)
    raw = slides["truncated"].read_bytes()
    slides["truncated"].write_bytes(raw[: int(len(raw) * 0.3)])
    slides["missing"].unlink()
    return {"slides": slides, "lists": lists, "index": index}


def _data(damaged: dict) -> dict:
    """The data section of the damaged cohort: its index, compiled before the damage."""
    return {"index": str(damaged["index"]), "tile_px": TILE, "mpp": 0.5}


def _unreadable(ds) -> set[int]:
    bad = set()
    for i in range(len(ds)):
        try:
            ds.read(i)
        except TileReadError:
            bad.add(i)
    return bad


def test_unreadable_tiles_are_found_and_good_ones_still_read(damaged: dict, tmp_path: Path) -> None:
    ds = build_dataset(_data(damaged))
    assert len(ds) == 4 * 64
    names = [p.stem for p in ds.sources]
    assert names == ["bad", "good", "missing", "truncated"]
    bad = _unreadable(ds)
    by_source = {n: {i - 64 * k for i in bad if i // 64 == k} for k, n in enumerate(names)}
    # read at level 0, the zeroed TIFF tile covers [0, 256)^2: grid tiles (0|128, 0|128)
    assert by_source["bad"] == {0, 1, 8, 9}
    assert by_source["good"] == set()
    assert by_source["missing"] == set(range(64))
    assert len(by_source["truncated"]) >= 1
    # after a failed read the handle is reopened: the next tile of that slide reads the same
    # pixels as the intact slide (same image)
    np.testing.assert_array_equal(ds.read(2), ds.read(64 + 2))
    with pytest.raises(TileReadError, match=r"missing\.svs") as info:
        ds.read(2 * 64)
    assert "\n" not in str(info.value)
    ds.close()


def _expected_skips(n: int, bad: set[int], *, seed: int, step: int, batch: int) -> tuple[int, list]:
    """Follow each sample's replacement chain: how many unreadable tiles, and the tiles used."""
    idx = sample_indices(n, seed=seed, step=step, batch_size=batch)
    skipped, used = 0, []
    for j, i in enumerate(idx.tolist()):
        attempt = 0
        while i in bad:
            skipped += 1
            i = replacement_index(n, seed=seed, position=step * batch + j, attempt=attempt)
            attempt += 1
        used.append(i)
    return skipped, used


def test_batches_replace_and_count_unreadable_tiles_in_worker_processes(
    damaged: dict, tmp_path: Path
) -> None:
    ds = build_dataset(_data(damaged))
    bad = _unreadable(ds)
    ds.close()
    aug = MultiCropAugment(global_crops_size=56, local_crops_number=1, local_crops_size=28)
    kw = {
        "seed": 0,
        "batch_size": 16,
        "patch_size": 14,
        "mask_probability": 0.5,
        "mask_ratio": (0.1, 0.5),
    }
    expected = [_expected_skips(len(ds), bad, seed=0, step=s, batch=16) for s in range(2, 8)]
    assert sum(e[0] for e in expected) > 0  # the premise: these batches meet broken tiles
    # in this process, from micro-step 2
    inline = [make_batch(ds, aug, step=s, **kw) for s in range(2, 8)]
    for b, (skips, used) in zip(inline, expected, strict=True):
        assert b["skipped"] == skips and b["indices"].tolist() == used
        assert b["global"].shape == (32, 3, 56, 56)
    # two worker processes, started at micro-step 2 as a resumed run would: the same batches
    loader = make_loader(MicroBatches(ds, aug, **kw), start=2, num_workers=2, seed=0)
    it = iterate(loader)
    got = [next(it) for _ in range(6)]
    assert len(multiprocessing.active_children()) >= 2  # real worker processes
    it.close()
    for a, b in zip(inline, got, strict=True):
        assert a["skipped"] == b["skipped"]
        assert torch.equal(a["indices"], b["indices"])
        assert torch.equal(a["global"], b["global"]) and torch.equal(a["masks"], b["masks"])
        assert torch.equal(a["local"], b["local"])


def test_training_goes_on_and_logs_the_replaced_tiles(damaged: dict, tmp_path: Path) -> None:
    sets = [
        f"data.index={damaged['index']}",
        "data.num_workers=2",
        "data.cache_in_memory=false",
        "optim.total_steps=3",
        "crops.local_crops_number=0",
    ]
    cfg = load_config("tiny_cpu", overrides=sets)
    state = train(cfg, tmp_path / "run")
    assert state.step == 3
    ds = build_dataset(cfg["data"])
    bad = _unreadable(ds)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    want = [_expected_skips(len(ds), bad, seed=0, step=s, batch=8)[0] for s in range(3)]
    assert [int(r["tiles_skipped"]) for r in rows] == want
    assert sum(want) > 0


def test_slide_handles_are_a_bounded_lru(cmu_svs: Path, he_png: Path, damaged: dict) -> None:
    handles = SlideHandles(max_open=2)
    paths = [cmu_svs, he_png, damaged["slides"]["good"]]
    a = handles.get(0, paths[0])
    b = handles.get(1, paths[1])
    assert handles.get(0, paths[0]) is a  # reused, and now the most recent
    c = handles.get(2, paths[2])
    assert len(handles) == 2 and b.closed and not a.closed and not c.closed
    again = handles.get(1, paths[1])  # evicted: opened afresh
    assert again is not b and not again.closed and a.closed
    handles.close()
    assert len(handles) == 0 and again.closed and c.closed


def test_a_worker_never_uses_handles_inherited_from_its_parent(cmu_svs: Path) -> None:
    handles = SlideHandles(max_open=4)
    handles.get(0, cmu_svs)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()

    def child() -> None:
        q.put(len(handles))  # the parent's handle is not this process's

    p = ctx.Process(target=child)
    p.start()
    p.join(60)
    assert q.get(timeout=5) == 0 and p.exitcode == 0
    assert len(handles) == 1  # the parent's own handle is untouched
    handles.close()
