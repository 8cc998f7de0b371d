"""The compiled tile index: tile lists of every tool in, exact coordinates and footprints out,
compact, rebuilt only when the inputs change, and read back with true x/y tile sizes."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from gpfm_core.cli import main
from gpfm_core.errors import ConfigError
from gpfm_core.slide import open_slide
from gpfm_core.tiling import make_tile_grid, read_tiles
from gpfm_core.train.data import build_dataset
from gpfm_core.train.tile_index import TileIndex, TileIndexError


def _gpfm_tiles(slide: Path, out: Path, *extra: str) -> Path:
    """``gpfm tiles SLIDE --mpp 1 --tile-px 64 --out OUT``: the written tile list."""
    assert (
        main(["tiles", str(slide), "--mpp", "1.0", "--tile-px", "64", "--out", str(out), *extra])
        == 0
    )
    (path,) = out.rglob("*_patches.h5")
    return path


def _write_coords(path: Path, coords: np.ndarray, attrs: dict) -> None:
    """A patching file as TRIDENT and CLAM write it: ``coords`` carrying the attributes."""
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=coords).attrs.update(attrs)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path, nonsquare_tif: Path) -> dict:
    """Tile lists of four tools and GPFM's JSON, with the grids they were made from."""
    root = tmp_path_factory.mktemp("store")
    gpfm = _gpfm_tiles(cmu_svs, root / "gpfm")
    wide = _gpfm_tiles(nonsquare_tif, root / "wide")
    with open_slide(cmu_svs) as s:
        grid = make_tile_grid(s, mpp=1.0, tile_px=64, min_tissue=0.25)
        g128 = make_tile_grid(s, mpp=1.0, tile_px=128, min_tissue=0.25)
    # TRIDENT (trident/IO.py coords_to_h5): attributes on `coords` only, no slide path
    trident = root / "trident" / "patches" / "cmu_small_region_patches.h5"
    _write_coords(
        trident,
        g128.coords[:30],
        {
            "patch_size": 64,
            "patch_size_level0": 256,
            "level0_magnification": 20,
            "target_magnification": 5,
            "overlap": 0,
            "name": "cmu_small_region",
            "savetodir": str(trident.parent),
        },
    )
    # CLAM (create_patches_fp.py): patch_size at patch_level with that level's downsample
    clam = root / "clam" / "patches" / "cmu_small_region.h5"
    attrs = {"patch_size": 100, "patch_level": 0, "downsample": [1.0, 1.0]}
    _write_coords(clam, grid.coords[:20], {**attrs, "name": "cmu_small_region"})
    # GPFM's JSON: {folder: [tile image names]}
    images = root / "png"
    images.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i, side in enumerate((64, 80, 64)):
        name = f"tile_{i}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(images / name)
        names.append(name)
    gpfm_json = root / "gpfm_train.json"
    gpfm_json.write_text(json.dumps({str(images): names}))
    with open_slide(nonsquare_tif) as s:
        wide_grid = make_tile_grid(s, mpp=1.0, tile_px=64, min_tissue=0.25)
    return {
        "gpfm": gpfm,
        "wide": wide,
        "trident": trident,
        "clam": clam,
        "json": gpfm_json,
        "grid": grid,
        "g128": g128,
        "wide_grid": wide_grid,
        "images": images,
        "names": names,
    }


def test_every_kind_of_tile_list_compiles_to_exact_rows(
    store: dict, data_dir: Path, cmu_svs: Path, nonsquare_tif: Path, tmp_path: Path
) -> None:
    data = {
        "tile_lists": [str(store[k]) for k in ("gpfm", "trident", "clam", "wide", "json")],
        "slide_dirs": [str(data_dir)],
        "tile_px": 64,
        "mpp": 1.0,
    }
    ds = build_dataset(data, index=tmp_path / "cohort.tileindex")
    index = ds.index
    grid, g128, wide = store["grid"], store["g128"], store["wide_grid"]
    sizes = [len(grid), 30, 20, len(wide), 3]
    assert len(ds) == len(index) == sum(sizes) and index.n_sources == 5
    assert np.array_equal(np.diff(index.source_start), sizes)
    # where every tile is, and its level-0 footprint (x, y) as each tool records it
    assert index.source_path(0) == cmu_svs.resolve()  # gpfm: the slide_path attribute
    assert index.source_path(1) == data_dir / "cmu_small_region.svs"  # TRIDENT: by name
    assert index.source_path(3) == nonsquare_tif.resolve()
    assert index.source_path(4) == store["images"]
    expected_size = [
        grid.tile_size_level0_xy,
        (256, 256),  # patch_size_level0
        (100, 100),  # patch_size x downsample of patch_level
        wide.tile_size_level0_xy,
        (0, 0),
    ]
    assert [tuple(v) for v in index.source_size.tolist()] == [tuple(v) for v in expected_size]
    assert wide.tile_size_level0_xy[0] > 1.9 * wide.tile_size_level0_xy[1]  # non-square pixels
    s = index.source_start
    assert np.array_equal(index.xy[s[0] : s[1]], grid.coords)
    assert np.array_equal(index.xy[s[1] : s[2]], g128.coords[:30])
    assert np.array_equal(index.xy[s[3] : s[4]], wide.coords)
    assert (index.xy[s[4] :] == -1).all()
    assert [index.ref(int(s[4]) + i).path for i in range(3)] == [
        store["images"] / n for n in store["names"]
    ]
    # read back: slides at their true x/y footprint, images as files
    with open_slide(cmu_svs) as slide:
        np.testing.assert_array_equal(ds[3], read_tiles(slide, grid, [3])[0])
        region = slide.read_region(tuple(int(v) for v in g128.coords[5]), 0, (256, 256))
    want = np.asarray(Image.fromarray(region).resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ds[int(s[1]) + 5], want)
    with open_slide(nonsquare_tif) as slide:
        for j in (0, len(wide) // 2):
            np.testing.assert_array_equal(ds[int(s[3]) + j], read_tiles(slide, wide, [j])[0])
    with Image.open(store["images"] / "tile_1.png") as im:  # 80 px -> 64 px
        want = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ds[int(s[4]) + 1], want)
    ds.close()


def test_a_tile_list_without_its_slide_is_one_line_naming_slide_dirs(
    store: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match=r"data\.slide_dirs") as info:
        build_dataset({"tile_lists": [str(store["trident"])]}, index=tmp_path / "a.tileindex")
    assert "cmu_small_region" in str(info.value) and "\n" not in str(info.value)
    # one missing slide among found ones: skipped with a warning, the others train
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(
            {"tile_lists": [str(store["gpfm"]), str(store["trident"])]},
            index=tmp_path / "b.tileindex",
        )
    assert len(ds) == len(store["grid"])
    assert "1 tile list(s) skipped" in caplog.text


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json", "not readable JSON"),
        ('["a.png"]', "not GPFM's tile list"),
        ('{"folder": "a.png"}', "not GPFM's tile list"),
    ],
)
def test_a_bad_gpfm_json_is_one_line(content: str, match: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        build_dataset({"tile_lists": [str(bad)]})
    assert "\n" not in str(info.value)


def _synthetic_lists(folder: Path, slide: Path, n_files: int, per_file: int) -> list[Path]:
    """Tile lists in gpfm's layout (root attributes, slide_path) with made-up coordinates."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = []
    for i in range(n_files):
        p = folder / f"slide_{i:03d}_patches.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("coords", data=rng.integers(0, 100_000, (per_file, 2)))
            f.attrs.update(
                {"tile_size_level0": 448, "stride_level0": 448, "slide_path": str(slide)}
            )
        out.append(p)
    return out


def test_the_index_is_compact_and_pickles_as_a_path(cmu_svs: Path, tmp_path: Path) -> None:
    lists = _synthetic_lists(tmp_path / "lists", cmu_svs, n_files=20, per_file=10_000)
    ds = build_dataset({"tile_lists": [str(tmp_path / "lists")]}, index=tmp_path / "i.tileindex")
    n = len(ds)
    assert n == 200_000 and ds.index.n_sources == len(lists)
    size = ds.index.nbytes
    assert size <= 8 * n + 64 * 1024  # 8 bytes per tile + the per-slide table and footer
    assert size / n <= 20  # the bound: <= 20 MB per million tiles
    # a loader worker receives the path, not the columns
    blob = pickle.dumps(ds)
    assert len(blob) < 4096
    back = pickle.loads(blob)
    assert len(back) == n and np.array_equal(back.index.xy[-5:], ds.index.xy[-5:])
    with h5py.File(lists[-1], "r") as f:
        assert np.array_equal(ds.index.xy[-10_000:], f["coords"][:])


def test_the_index_is_rebuilt_only_when_its_inputs_change(cmu_svs: Path, tmp_path: Path) -> None:
    lists = _synthetic_lists(tmp_path / "lists", cmu_svs, n_files=3, per_file=100)
    data = {"tile_lists": [str(tmp_path / "lists")]}
    path = tmp_path / "run" / "tiles.tileindex"
    build_dataset(data, index=path)
    first = path.stat()
    build_dataset(data, index=path)  # same inputs: the file is mapped as it is
    assert path.stat().st_ino == first.st_ino and path.stat().st_mtime_ns == first.st_mtime_ns
    with h5py.File(lists[0], "r+") as f:  # a tile list is rewritten with fewer tiles
        del f["coords"]
        f.create_dataset("coords", data=np.zeros((10, 2), np.int64))
    assert len(build_dataset(data, index=path)) == 210
    assert path.stat().st_ino != first.st_ino
    # a truncated index (a crash of another tool) is built again, never read
    path.write_bytes(path.read_bytes()[:100])
    assert len(build_dataset(data, index=path)) == 210
    # an index named without inputs is used as it is; a broken one is one line
    assert len(build_dataset({"index": str(path), "use_sample_data": False})) == 210
    path.write_bytes(b"GPFMTIX1 but nothing more")
    with pytest.raises(ConfigError, match="build it again") as info:
        build_dataset({"index": str(path), "use_sample_data": False})
    assert "\n" not in str(info.value)
    with pytest.raises(TileIndexError):
        TileIndex.open(tmp_path / "missing.tileindex")
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no temporary file left


@pytest.mark.parametrize("every", [2, 4, 7])
def test_holdout_split_is_every_kth_tile(cmu_svs: Path, tmp_path: Path, every: int) -> None:
    _synthetic_lists(tmp_path / "lists", cmu_svs, n_files=2, per_file=25)
    data = {"tile_lists": [str(tmp_path / "lists")], "holdout_every": every}
    idx = tmp_path / "i.tileindex"
    train, held = build_dataset(data, index=idx), build_dataset(data, split="holdout", index=idx)
    rows_t, rows_h = train.rows(np.arange(len(train))), held.rows(np.arange(len(held)))
    assert np.array_equal(rows_h, np.arange(every - 1, 50, every))
    assert np.array_equal(np.sort(np.concatenate([rows_t, rows_h])), np.arange(50))
    assert np.array_equal(held.labels, held.index.source_of(rows_h))
