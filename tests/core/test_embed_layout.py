"""Outputs never overwrite each other, and concurrent writers are safe (issue 9, item 3).

Real slides (the CMU sample, a generated pyramid), the real tiny encoders, real processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpfm_core.cli import main
from gpfm_core.embed import (
    EmbedCancelled,
    EmbeddingsClashError,
    EmbeddingsLockTimeout,
    embed_slide,
    find_embeddings,
    load_embeddings,
)
from gpfm_core.embed.layout import (
    claim_slide_file,
    coords_dir,
    embeddings_path,
    encoder_dirname,
    features_dir,
    lock_path,
    settings_diff,
    slide_file_names,
    slide_lock,
    stale_temps,
    tiling_dirname,
)
from gpfm_core.encoders import create_encoder
from gpfm_core.slide import open_slide
from gpfm_core.tiling import make_tile_grid

MPP = 2.0  # tiny encoders read 112 px tiles: ~13 tissue tiles on the CMU sample
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _slide_id(path: Path) -> str:
    with open_slide(path) as s:
        return s.info.slide_id


def _folder(out: Path, encoder: str = "tiny-vit", mpp: float = MPP) -> Path:
    wh = create_encoder(encoder).weights_hash
    return features_dir(out, encoder=encoder, weights_hash=wh, mpp=mpp, tile_px=112)


def _embed_cli(*args: str) -> int:
    return main(
        ["embed", *args, "--encoder", "tiny-vit", "--mpp", "2", "--device", "cpu", "--quiet"]
    )


# ------------------------------------------------------------------ names
@pytest.mark.parametrize(
    ("mpp", "tile_px", "overlap", "name"),
    [
        (0.5, 224, 0, "0.5mpp_224px_0px_overlap"),
        (2.0, 112, 16, "2mpp_112px_16px_overlap"),
        (0.499, 256, 0, "0.499mpp_256px_0px_overlap"),  # exact µm/px, not a rounded 20x
    ],
)
def test_tiling_folder_names(mpp: float, tile_px: int, overlap: int, name: str) -> None:
    assert tiling_dirname(mpp=mpp, tile_px=tile_px, overlap_px=overlap) == name


@pytest.mark.parametrize(
    ("encoder", "weights_hash", "name"),
    [
        (
            "uni",
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "features_uni-9f86d081",
        ),
        ("hed-texture", "none", "features_hed-texture"),  # TRIDENT's own name without weights
        ("timm:vit_small/patch14", "ABCDEF0123", "features_timm-vit_small-patch14-abcdef01"),
    ],
)
def test_encoder_folder_names(encoder: str, weights_hash: str, name: str) -> None:
    assert encoder_dirname(encoder, weights_hash) == name


def test_random_inits_with_other_seeds_get_other_folders() -> None:
    a, b = (
        encoder_dirname("tiny-vit", "random-init-seed0"),
        encoder_dirname("tiny-vit", "random-init-seed1"),
    )
    assert a != b and a.startswith("features_tiny-vit-") and len(a) == len("features_tiny-vit-") + 8


def test_slide_names_and_tiles_folder(tmp_path: Path) -> None:
    assert slide_file_names("a/S01.svs", "0123456789abcdef") == ("S01.h5", "S01-01234567.h5")
    assert slide_file_names("b/x.ome.tiff", "ff" * 8, suffix="_patches.h5") == (
        "x.ome_patches.h5",
        "x.ome-ffffffff_patches.h5",
    )
    assert (
        coords_dir(tmp_path, mpp=0.5, tile_px=224)
        == tmp_path / "0.5mpp_224px_0px_overlap" / "patches"
    )
    assert lock_path(tmp_path / "S01.h5") == tmp_path / ".locks" / "S01.h5.lock"


@pytest.mark.parametrize(
    ("wanted", "diff"),
    [
        ({"min_tissue": 0.25 + 1e-9, "encoder": "tiny-vit", "tile_px": None}, []),
        ({"min_tissue": 0.5}, ["min_tissue 0.25 in the file, 0.5 here"]),
        (
            {"tissue_detector": "v2"},
            ["no tissue_detector recorded in the file (made by an older or another tool)"],
        ),
        # the parameter that changed, not two long JSON strings
        (
            {"tissue_params": '{"mask_mpp": 8.0, "open_um": 4.0}'},
            ["tissue_params.open_um 8.0 in the file, 4.0 here"],
        ),
    ],
)
def test_settings_diff_names_what_differs(wanted: dict, diff: list[str]) -> None:
    stored = {
        "min_tissue": 0.25,
        "encoder": "tiny-vit",
        "tissue_params": '{"mask_mpp": 8.0, "open_um": 8.0}',
    }
    assert settings_diff(stored, wanted) == diff


# ------------------------------------------------------------------ the examples
def _same_stem(tmp: Path, first: Path, second: Path, suffix: str) -> tuple[Path, Path]:
    """Two different slides both named S01: ``a/S01.svs`` and ``b/S01<suffix>``."""
    a, b = tmp / "a" / "S01.svs", tmp / "b" / f"S01{suffix}"
    for src, dst in ((first, a), (second, b)):
        dst.parent.mkdir()
        shutil.copyfile(src, dst)
    return a, b


def test_two_slides_with_one_stem_from_two_folders_keep_two_files(
    cmu_svs: Path, small_pyramid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `gpfm embed a/S01.svs b/S01.tif --out out` used to leave one S01.h5 holding b only
    a, b = _same_stem(tmp_path, cmu_svs, small_pyramid, ".tif")
    out = tmp_path / "out"
    assert _embed_cli(str(a), str(b), "--out", str(out)) == 0
    text = capsys.readouterr().out
    id_a, id_b = _slide_id(a), _slide_id(b)
    folder = _folder(out)
    file_a, file_b = folder / "S01.h5", folder / f"S01-{id_b[:8]}.h5"
    assert f"{a} -> {file_a}" in text and f"{b} -> {file_b}" in text
    assert sorted(p.name for p in folder.glob("*.h5")) == sorted([file_a.name, file_b.name])
    for path, slide, sid in ((file_a, a, id_a), (file_b, b, id_b)):
        emb = load_embeddings(path)
        with open_slide(slide) as s:
            grid = make_tile_grid(s, mpp=MPP, tile_px=112)
        assert emb.attrs["slide_id"] == sid and emb.attrs["slide_path"] == str(slide.resolve())
        np.testing.assert_array_equal(emb.coords, grid.coords)
        with h5py.File(path, "r") as f:  # what a TRIDENT / CLAM user reads
            assert f["features"].shape == (len(grid), 64) and f["coords"].attrs["name"] == "S01"
    # each slide finds its own file again, whatever the order of the next run
    assert _embed_cli(str(b), str(a), "--out", str(out)) == 0
    assert capsys.readouterr().out.count("reused existing file") == 2
    tiling = {"encoder": "tiny-vit", "mpp": MPP, "tile_px": 112}
    wh = create_encoder("tiny-vit").weights_hash
    assert find_embeddings(b, out, weights_hash=wh, **tiling) == file_b
    assert embeddings_path(a, out, slide_id=id_a, weights_hash=wh, **tiling) == file_a


def test_second_encoder_and_second_tiling_keep_the_first_file(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _embed_cli(str(cmu_svs), "--out", str(out)) == 0
    first = _folder(out) / "cmu_small_region.h5"
    before = load_embeddings(first).features.copy()
    # a second encoder into the same folder
    assert main(["embed", str(cmu_svs), "--encoder", "tiny-expert", "--mpp", "2", "--out", str(out), "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    second = _folder(out, "tiny-expert") / "cmu_small_region.h5"
    # a second tiling into the same folder
    assert main(["embed", str(cmu_svs), "--encoder", "tiny-vit", "--mpp", "1", "--out", str(out), "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    third = _folder(out, mpp=1.0) / "cmu_small_region.h5"
    assert len({first, second, third}) == 3
    assert sorted(p.relative_to(out) for p in out.rglob("*.h5")) == sorted(
        p.relative_to(out) for p in (first, second, third)
    )
    np.testing.assert_array_equal(load_embeddings(first).features, before)
    assert (
        load_embeddings(second).embed_dim == 48 and load_embeddings(second).encoder == "tiny-expert"
    )
    assert load_embeddings(third).attrs["requested_mpp"] == 1.0


def test_other_settings_are_refused_in_one_line_and_force_replaces(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _embed_cli(str(cmu_svs), "--out", str(out)) == 0
    path = _folder(out) / "cmu_small_region.h5"
    n_default = len(load_embeddings(path))
    capsys.readouterr()
    assert _embed_cli(str(cmu_svs), "--out", str(out), "--min-tissue", "0.9") == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and str(cmu_svs) in failed[0] and str(path) in failed[0]
    assert "min_tissue 0.25 in the file, 0.9 here" in failed[0] and "--force" in failed[0]
    assert len(load_embeddings(path)) == n_default  # untouched
    assert _embed_cli(str(cmu_svs), "--out", str(out), "--min-tissue", "0.9", "--force") == 0
    replaced = load_embeddings(path)
    assert replaced.attrs["min_tissue"] == 0.9 and 0 < len(replaced) < n_default


def test_a_new_tissue_detector_never_reuses_old_files(
    cmu_svs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpfm_core.tissue as tissue

    path = embed_slide(cmu_svs, encoder="tiny-vit", out_dir=tmp_path, mpp=MPP, device="cpu")
    attrs = load_embeddings(path).attrs
    assert attrs["tissue_detector"] == tissue.DETECTOR_VERSION
    assert '"mask_mpp": 8.0' in attrs["tissue_params"]  # the detector's parameters, recorded
    monkeypatch.setattr(tissue, "DETECTOR_VERSION", "a-better-detector-2")
    with pytest.raises(
        EmbeddingsClashError, match=r"tissue_detector .* in the file, a-better-detector-2 here"
    ):
        embed_slide(cmu_svs, encoder="tiny-vit", out_dir=tmp_path, mpp=MPP, device="cpu")
    again = embed_slide(
        cmu_svs, encoder="tiny-vit", out_dir=tmp_path, mpp=MPP, device="cpu", force=True
    )
    assert again == path and load_embeddings(path).attrs["tissue_detector"] == "a-better-detector-2"


def test_a_foreign_file_at_the_name_is_left_alone(cmu_svs: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    folder.mkdir(parents=True)
    trident = folder / "cmu_small_region.h5"  # TRIDENT wrote one here: no slide_id
    with h5py.File(trident, "w") as f:
        f.create_dataset("features", data=np.ones((2, 3), np.float32))
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    path = embed_slide(cmu_svs, encoder="tiny-vit", out_dir=tmp_path, mpp=MPP, device="cpu")
    assert path == folder / f"cmu_small_region-{_slide_id(cmu_svs)[:8]}.h5"
    with h5py.File(trident, "r") as f:
        assert f["features"].shape == (2, 3)


def test_both_names_held_by_other_slides_is_refused_naming_both(tmp_path: Path) -> None:
    for name, sid in (("S01.h5", "1111111111111111"), ("S01-abcdef01.h5", "abcdef0122222222")):
        with h5py.File(tmp_path / name, "w") as f:
            f.attrs["slide_id"] = sid
    with (
        pytest.raises(EmbeddingsClashError) as err,
        claim_slide_file(tmp_path, "x/S01.svs", "abcdef0133333333"),
    ):
        pass
    msg = str(err.value)
    assert str(tmp_path / "S01.h5") in msg and str(tmp_path / "S01-abcdef01.h5") in msg
    assert "\n" not in msg and "x/S01.svs" in msg


# ------------------------------------------------------------------ locks and processes
_HOLDER = (
    "import sys\n"
    "from gpfm_core.embed.layout import slide_lock\n"
    "with slide_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.readline()\n"
)


def test_lock_excludes_another_process_until_it_ends(tmp_path: Path) -> None:
    import threading

    target = tmp_path / "S01.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(EmbeddingsLockTimeout, match="being written by another process"),
            slide_lock(target, timeout=0.3),
        ):
            pass
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(EmbedCancelled), slide_lock(target, cancel=cancel):
            pass
        holder.send_signal(signal.SIGKILL)  # a dead holder's lock is released by the OS
        holder.wait(30)
        with slide_lock(target, timeout=60) as locked:
            assert locked == target
    finally:
        if holder.poll() is None:
            holder.kill()


_WORKER = (
    "import sys\n"
    "from gpfm_core.embed import iter_embed_slide\n"
    "gen = iter_embed_slide(sys.argv[1], encoder='tiny-vit', out_dir=sys.argv[2], mpp=2.0,\n"
    "                       batch_size=2, workers=1, device='cpu')\n"
    "next(gen)\n"
    "print('embedding', flush=True)\n"
    "sys.stdin.readline()\n"
    "for _ in gen:\n"
    "    pass\n"
    "print('done', flush=True)\n"
)


@pytest.mark.parametrize("first_worker", ["finishes", "is killed"])
def test_second_process_waits_for_the_first_then_reuses_or_takes_over(
    first_worker: str, cmu_svs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    final = _folder(out) / "cmu_small_region.h5"
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(cmu_svs), str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    second = None
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "embedding"
        assert len(stale_temps(final)) == 1 and not final.exists()  # mid-write, lock held
        cli = [sys.executable, "-m", "gpfm_core", "-v", "embed", str(cmu_svs), "--encoder", "tiny-vit", "--mpp", "2", "--out", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
        second = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
        assert second.stderr is not None
        err_lines = []
        for line in second.stderr:  # until it says it waits for the worker's lock
            err_lines.append(line)
            if "waiting for" in line:
                break
        assert any("waiting for" in line and "cmu_small_region.h5" in line for line in err_lines)
        if first_worker == "finishes":
            worker.stdin.write("go\n")  # type: ignore[union-attr]
            worker.stdin.flush()  # type: ignore[union-attr]
            assert worker.stdout.readline().strip() == "done" and worker.wait(120) == 0
        else:
            worker.send_signal(signal.SIGKILL)
            worker.wait(30)
        stdout, rest = second.communicate(timeout=300)
        stderr = "".join(err_lines) + rest
        assert second.returncode == 0, stderr
        assert "Traceback" not in stderr and "FileNotFoundError" not in stderr
        if first_worker == "finishes":
            assert "reused existing file" in stdout  # exactly one embedded: the worker
        else:
            assert "tiles/s" in stdout and "reused" not in stdout  # it took the slide over
    finally:
        for proc in (worker, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    emb = load_embeddings(final)
    with open_slide(cmu_svs) as s:
        grid = make_tile_grid(s, mpp=MPP, tile_px=112)
    np.testing.assert_array_equal(emb.coords, grid.coords)
    assert len(emb) == len(grid) > 0 and np.all(np.isfinite(emb.features))
    assert np.all(np.abs(emb.features).sum(axis=1) > 0)  # every row written
    assert stale_temps(final) == [] and list(out.rglob("*.h5")) == [final]


def test_two_processes_started_together_embed_the_slide_once(cmu_svs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "gpfm_core", "embed", str(cmu_svs), "--encoder", "tiny-vit", "--mpp", "2", "--out", str(out), "--device", "cpu", "--quiet", "--batch-size", "2"]  # fmt: skip
    procs = [
        subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all("Traceback" not in err for _, err in results)
    assert sum("reused existing file" in out_ for out_, _ in results) == 1
    assert sum("tiles/s" in out_ for out_, _ in results) == 1
    final = _folder(out) / "cmu_small_region.h5"
    emb = load_embeddings(final)
    assert len(emb) == emb.attrs["n_tiles"] > 0 and list(out.rglob("*.h5")) == [final]


# ------------------------------------------------------------------ gpfm tiles --out
def test_tiles_out_folder_follows_the_layout_and_the_rules(
    cmu_svs: Path, small_pyramid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _same_stem(tmp_path, cmu_svs, small_pyramid, ".svs")
    out = tmp_path / "coords"
    tiles = ["tiles", "--mpp", "2", "--tile-px", "112", "--out", str(out)]
    assert main([tiles[0], str(a), *tiles[1:]]) == 0
    assert main([tiles[0], str(b), *tiles[1:]]) == 0
    folder = coords_dir(out, mpp=2.0, tile_px=112)
    file_a, file_b = folder / "S01_patches.h5", folder / f"S01-{_slide_id(b)[:8]}_patches.h5"
    assert sorted(folder.glob("*.h5")) == sorted([file_a, file_b])
    for path, slide in ((file_a, a), (file_b, b)):
        with h5py.File(path, "r") as f, open_slide(slide) as s:
            grid = make_tile_grid(s, mpp=2.0, tile_px=112)
            np.testing.assert_array_equal(f["coords"][:], grid.coords)
            attrs = dict(f["coords"].attrs)  # what TRIDENT reads from a coordinates file
            assert (
                attrs["patch_size"] == 112 and attrs["patch_size_level0"] == grid.tile_size_level0
            )
            assert attrs["target_magnification"] == 5 and attrs["overlap"] == 0
    capsys.readouterr()
    assert main([tiles[0], str(a), *tiles[1:], "--min-tissue", "0.9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(file_a) in err and str(a) in err and "--force" in err
    assert main([tiles[0], str(a), *tiles[1:], "--min-tissue", "0.9", "--force"]) == 0
    with h5py.File(file_a, "r") as f:
        assert f.attrs["min_tissue"] == 0.9


def test_tiles_out_file_of_another_slide_is_refused(
    cmu_svs: Path, small_pyramid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "coords.h5"
    assert main(["tiles", str(cmu_svs), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["tiles", str(small_pyramid), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and str(small_pyramid) in err
    assert str(cmu_svs.resolve()) in err  # the slide the file holds
    with h5py.File(out, "r") as f:
        assert f.attrs["slide_id"] == _slide_id(cmu_svs)
    assert main(["tiles", str(cmu_svs), "--out", str(out)]) == 0  # same slide, same settings
    assert main(["tiles", str(small_pyramid), "--out", str(out), "--force"]) == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["slide_id"] == _slide_id(small_pyramid)
