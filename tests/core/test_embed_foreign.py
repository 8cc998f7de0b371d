"""TRIDENT and CLAM feature files load onto the right grid (issue 9, item 6).

The files are written with h5py the way those tools write them (the attribute names, dtypes,
chunking and append pattern of TRIDENT's ``trident/IO.py`` ``save_h5`` / ``coords_to_h5`` and
``WSIPatcher``, and of CLAM's ``wsi_core/WholeSlideImage.py`` ``process_contour``,
``wsi_core/wsi_utils.py`` and ``utils/file_utils.py`` ``save_hdf5``), then read back; the
tile size and positions must be the ones those tools read from the slide.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from _foreign_h5 import (
    D,
    clam_contour,
    save_hdf5,
    write_clam_features,
    write_clam_patches,
    write_trident,
)
from gpfm_core.embed import EmbeddingsFileError, GeometryWarning, load_embeddings


# ------------------------------------------------------------------ helpers
def _trident_grid(patch_size: int, src_mag: int, target_mag: int, overlap: int, rows: int, cols: int) -> np.ndarray:  # fmt: skip
    """``WSIPatcher``'s grid from (0, 0), with a few tiles dropped as tissue filtering does."""
    ds = src_mag / target_mag
    step = round(patch_size * ds) - round(overlap * ds)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = np.stack([cc.ravel() * step, rr.ravel() * step], axis=1)
    return coords[(cc.ravel() + rr.ravel()) % 3 != 0]


def _assert_placed(emb: Any, coords: np.ndarray, tile: int, stride: int) -> None:
    np.testing.assert_array_equal(emb.coords, coords)
    assert emb.geometry.tile_size_level0 == tile and emb.geometry.stride_level0 == stride
    boxes = emb.tile_boxes()  # each tile exactly where the tool read it
    np.testing.assert_array_equal(boxes[:, :2], coords)
    np.testing.assert_array_equal(boxes[:, 2:] - boxes[:, :2], tile)
    g = emb.geometry
    cells = np.asarray(g.origin) + emb.grid_rc[:, ::-1] * stride  # the raster's placement
    err = np.abs(cells - coords).max()
    assert err == g.grid_error_level0 and err <= stride // 2 and g.exact == (err == 0)
    assert np.all(emb.grid_rc >= 0) and np.all(emb.grid_rc < np.asarray(g.grid_shape))
    assert len({tuple(rc) for rc in emb.grid_rc}) == len(emb)  # no two tiles in one cell


# ------------------------------------------------------------------ CLAM
def test_clam_contours_with_their_own_grid_origins(tmp_path: Path) -> None:
    # the file: the second contour's grid starts 212 px off the first one's
    a = clam_contour((1000, 2000), (6 * 512, 4 * 512), 512)
    b = clam_contour((1212, 5000), (5 * 512, 3 * 512), 512)
    patches = tmp_path / "patches" / "S01.h5"
    patches.parent.mkdir()
    coords = write_clam_patches(
        patches,
        [a, b],
        patch_size=512,
        patch_level=0,
        downsample=(1.0, 1.0),
        level_dim=(20000, 15000),
    )
    assert np.diff(np.unique(coords[:, 0])).min() == 212  # what the old gap-based guess saw
    emb = load_embeddings(_as_features(patches, coords, tmp_path))
    _assert_placed(emb, coords, 512, 512)
    assert emb.geometry.source == "clam" and not emb.geometry.exact
    # the larger contour (24 tiles) is on the raster exactly; the other at its nearest cells
    in_a = np.arange(len(a))
    cells = np.asarray(emb.geometry.origin) + emb.grid_rc[:, ::-1] * 512
    np.testing.assert_array_equal(cells[in_a], coords[in_a])
    assert emb.geometry.grid_error_level0 == 212


@pytest.mark.parametrize(
    ("patch_size", "level", "downsample", "step_size", "tile", "stride"),
    [
        (256, 0, (1.0, 1.0), 256, 256, 256),  # CLAM's defaults
        (256, 1, (4.0, 4.0), 256, 1024, 1024),  # patch_level 1 of a 4x pyramid
        (256, 2, (16.0, 16.0), 128, 4096, 2048),  # level 2, step half the patch: overlap
        (256, 0, (1.0, 1.0), 192, 256, 192),  # overlap at level 0
        # a padded pyramid: CLAM estimates 3.998 from the level sizes, reads 256 px there
        # (1023.5 level-0 px) but steps by 256 * int(3.998) = 768
        (256, 1, (3.998, 3.998), 256, 1023, 768),
    ],
)
def test_clam_patch_levels_downsamples_and_steps(
    tmp_path: Path,
    patch_size: int,
    level: int,
    downsample: tuple[float, float],
    step_size: int,
    tile: int,
    stride: int,
) -> None:
    step0 = step_size * int(downsample[0])  # WholeSlideImage.process_contour
    keep = lambda c: (c[:, 0] // step0 + c[:, 1] // step0) % 4 != 1  # noqa: E731  holes in tissue
    contours = [
        clam_contour((300, 700), (8 * step0, 5 * step0), step0, keep),
        clam_contour((300 + 9 * step0 + 77, 900), (4 * step0, 6 * step0), step0, keep),
    ]
    patches = tmp_path / "patches" / "S02.h5"
    patches.parent.mkdir()
    coords = write_clam_patches(
        patches,
        contours,
        patch_size=patch_size,
        patch_level=level,
        downsample=downsample,
        level_dim=(5000, 4000),
    )
    emb = load_embeddings(_as_features(patches, coords, tmp_path))
    _assert_placed(emb, coords, tile, stride)


def _as_features(patches: Path, coords: np.ndarray, root: Path) -> Path:
    """CLAM's features of the tiles in ``patches``: ``<root>/h5_files/<name>.h5``."""
    feats_path = root / "h5_files" / patches.name
    feats_path.parent.mkdir(exist_ok=True)
    write_clam_features(feats_path, coords)
    return feats_path


def test_clam_features_take_the_geometry_from_the_patching_file(tmp_path: Path) -> None:
    coords = clam_contour((64, 96), (5 * 1024, 3 * 1024), 1024)
    patches = tmp_path / "RESULTS" / "patches" / "S03.h5"
    patches.parent.mkdir(parents=True)
    write_clam_patches(
        patches,
        [coords],
        patch_size=256,
        patch_level=1,
        downsample=(4.0, 4.0),
        level_dim=(9000, 7000),
    )
    # CLAM's usual layout: FEATURES/h5_files beside RESULTS/patches: not found, so pass it
    feats = tmp_path / "FEATURES" / "h5_files" / "S03.h5"
    feats.parent.mkdir(parents=True)
    write_clam_features(feats, coords)
    with h5py.File(feats, "r") as f:
        assert dict(f["coords"].attrs) == {} and f["coords"].dtype == np.int32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guessed = load_embeddings(feats)
    (w,) = [c for c in caught if c.category is GeometryWarning]
    assert "\n" not in str(w.message) and "tile size 1024" in str(w.message)
    assert "assumes no overlap" in str(w.message) and guessed.geometry.source == "spacing"
    emb = load_embeddings(feats, coords_file=patches)
    _assert_placed(emb, coords, 1024, 1024)
    assert emb.geometry.source == "clam" and emb.attrs["patch_level"] == 1
    # features and patches under one results folder: found without being named
    (tmp_path / "RESULTS" / "h5_files").mkdir()
    beside = tmp_path / "RESULTS" / "h5_files" / "S03.h5"
    write_clam_features(beside, coords)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        assert load_embeddings(beside).geometry.source == "clam"
    other = tmp_path / "other.h5"
    write_clam_patches(
        other,
        [coords[:3]],
        patch_size=256,
        patch_level=1,
        downsample=(4.0, 4.0),
        level_dim=(9000, 7000),
    )
    with pytest.raises(EmbeddingsFileError, match="holds other tiles"):
        load_embeddings(feats, coords_file=other)


def test_clam_level_above_zero_without_downsample_says_so(tmp_path: Path) -> None:
    coords = clam_contour((0, 0), (3 * 1024, 2 * 1024), 1024)
    patches = tmp_path / "p.h5"
    write_clam_patches(patches, [coords], patch_size=256, patch_level=1, downsample=None, level_dim=(9000, 7000))  # fmt: skip
    with pytest.warns(GeometryWarning, match="patch_level 1 without its 'downsample'"):
        emb = load_embeddings(patches.parent / _features_with_attrs(patches, coords))
    assert emb.geometry.tile_size_level0 == 1024 and emb.geometry.source == "spacing"


def _features_with_attrs(patches: Path, coords: np.ndarray) -> str:
    """A features file carrying the patching file's ``coords`` attributes (as TRIDENT copies them)."""
    with h5py.File(patches, "r") as f:
        attrs = dict(f["coords"].attrs)
    out = patches.with_name("feats.h5")
    save_hdf5(out, {"features": np.zeros((len(coords), D), np.float32), "coords": coords}, {"coords": attrs}, mode="w")  # fmt: skip
    return out.name


def test_geometry_that_cannot_be_known_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "h5_files" / "lonely.h5"
    path.parent.mkdir()
    write_clam_features(path, np.array([[4096, 2048]]))
    with pytest.warns(GeometryWarning) as record:
        emb = load_embeddings(path)
    (msg,) = [str(r.message) for r in record if r.category is GeometryWarning]
    assert "\n" not in msg and "cannot be known" in msg and "coords_file" in msg
    assert len(emb) == 1 and emb.features.shape == (1, D)  # the features still load
    assert not emb.geometry.known and emb.tile_size_level0 is None
    with pytest.raises(EmbeddingsFileError, match="cannot be known"):
        emb.tile_boxes()


# ------------------------------------------------------------------ TRIDENT
@pytest.mark.parametrize(
    ("patch_size", "src_mag", "target_mag", "overlap", "tile", "stride"),
    [
        (256, 40, 20, 0, 512, 512),
        (256, 20, 20, 0, 256, 256),
        (224, 40, 20, 32, 448, 384),  # overlap is in target px: 64 level-0 px
        (512, 40, 10, 0, 2048, 2048),
        # 40x -> 15x: TRIDENT reads round(256 * 8 / 3) = 683 px, while its patch_size_level0
        # attribute says 256 * 40 // 15 = 682
        (256, 40, 15, 0, 683, 683),
    ],
)
def test_trident_files_of_several_tilings(
    tmp_path: Path,
    patch_size: int,
    src_mag: int,
    target_mag: int,
    overlap: int,
    tile: int,
    stride: int,
) -> None:
    coords = _trident_grid(patch_size, src_mag, target_mag, overlap, rows=5, cols=7)
    path = tmp_path / "features_uni_v1" / "S04.h5"
    path.parent.mkdir()
    feats = write_trident(path, coords, patch_size=patch_size, src_mag=src_mag, target_mag=target_mag, overlap=overlap)  # fmt: skip
    emb = load_embeddings(path)
    _assert_placed(emb, coords, tile, stride)
    g = emb.geometry
    assert g.exact and g.origin == (0, 0) and g.source == "trident"
    np.testing.assert_array_equal(emb.grid_rc, coords[:, ::-1] // stride)  # WSIPatcher's rows/cols
    np.testing.assert_array_equal(emb.features, feats)
    assert emb.encoder == "uni_v1" and emb.attrs["name"] == "S04"


@pytest.mark.parametrize(
    ("drop", "tile", "stride"),
    [
        (("level0_magnification", "target_magnification"), 512, 448),  # from patch_size_level0
        (("patch_size_level0",), 512, 448),  # from the magnifications
        (("overlap",), 512, 512),  # an older file: no overlap recorded, none assumed
    ],
)
def test_trident_files_missing_attributes(
    tmp_path: Path, drop: tuple[str, ...], tile: int, stride: int
) -> None:
    coords = _trident_grid(256, 40, 20, 0 if "overlap" in drop else 32, rows=4, cols=4)
    path = tmp_path / "S05.h5"
    write_trident(path, coords, patch_size=256, src_mag=40, target_mag=20, overlap=32, drop=drop)
    emb = load_embeddings(path)
    assert emb.geometry.tile_size_level0 == tile and emb.geometry.stride_level0 == stride


def test_trident_empty_slide(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:  # WSI.extract_features on a slide without tissue
        f.create_dataset("features", data=np.empty((0,), np.float32))
        c = f.create_dataset("coords", data=np.empty((0, 2), np.int64))
        c.attrs.update({"patch_size": 256, "patch_size_level0": 512, "overlap": 0})
    emb = load_embeddings(path)
    assert len(emb) == 0 and emb.grid_rc.shape == (0, 2) and emb.geometry.tile_size_level0 == 512
