"""Write feature and patching files the way TRIDENT and CLAM write them (h5py, no mocks).

The attribute names, dtypes, chunking and append pattern of TRIDENT's ``trident/IO.py``
``save_h5`` / ``coords_to_h5`` and ``WSIPatcher``, and of CLAM's
``wsi_core/WholeSlideImage.py`` ``process_contour``, ``wsi_core/wsi_utils.py`` and
``utils/file_utils.py`` ``save_hdf5``. Used by ``tests/core/test_embed_foreign.py`` and the
dock's tests (``tests/napari/test_dock_foreign.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

D = 8


def save_hdf5(path: Path, assets: dict[str, np.ndarray], attrs: dict | None = None, *, mode: str = "a", chunk: int = 1) -> None:  # fmt: skip
    """CLAM's / TRIDENT's ``save_hdf5``: resizable chunked datasets, appended batch by batch."""
    with h5py.File(path, mode) as f:
        for key, val in assets.items():
            if key not in f:
                ds = f.create_dataset(
                    key,
                    shape=val.shape,
                    maxshape=(None, *val.shape[1:]),
                    chunks=(chunk, *val.shape[1:]),
                    dtype=val.dtype,
                )
                ds[:] = val
                for k, v in ((attrs or {}).get(key) or {}).items():
                    ds.attrs[k] = v
            else:
                ds = f[key]
                ds.resize(len(ds) + val.shape[0], axis=0)
                ds[-val.shape[0] :] = val


def clam_contour(
    start: tuple[int, int], size: tuple[int, int], step0: int, keep=None
) -> np.ndarray:
    """Coordinates of one CLAM contour: a grid from the contour's bounding box (x-major)."""
    xs = np.arange(start[0], start[0] + size[0], step0)
    ys = np.arange(start[1], start[1] + size[1], step0)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    coords = np.array([gx.flatten(), gy.flatten()]).transpose()
    return coords if keep is None else coords[keep(coords)]


def write_clam_patches(
    path: Path,
    contours: list[np.ndarray],
    *,
    patch_size: int,
    patch_level: int,
    downsample: tuple[float, float] | None,
    level_dim: tuple[int, int],
) -> np.ndarray:
    """``create_patches_fp.py``: one append per contour, attributes from the first one."""
    attr: dict[str, Any] = {
        "patch_size": patch_size,
        "patch_level": patch_level,
        "downsample": downsample,
        "downsampled_level_dim": tuple(np.array(level_dim)),
        "level_dim": level_dim,
        "name": path.stem,
        "save_path": str(path.parent),
    }
    if downsample is None:  # an older or hand-made file
        del attr["downsample"]
    first = True
    for coords in contours:
        if len(coords):
            save_hdf5(path, {"coords": coords}, {"coords": attr} if first else None, mode="w" if first else "a")  # fmt: skip
            first = False
    return np.concatenate(contours)


def write_clam_features(
    path: Path, coords: np.ndarray, *, batch: int = 5, features: np.ndarray | None = None
) -> np.ndarray:
    """``extract_features_fp.py``: batches of features (float32) and coords (int32), no attributes."""
    rng = np.random.default_rng(0)
    feats = (
        rng.standard_normal((len(coords), D)).astype(np.float32)
        if features is None
        else np.asarray(features, np.float32)
    )
    mode = "w"
    for i in range(0, len(coords), batch):
        save_hdf5(
            path,
            {"features": feats[i : i + batch], "coords": coords[i : i + batch].astype(np.int32)},
            mode=mode,
            chunk=32,
        )
        mode = "a"
    return feats


def write_trident(
    path: Path,
    coords: np.ndarray,
    *,
    patch_size: int,
    src_mag: int,
    target_mag: int,
    overlap: int = 0,
    drop: tuple[str, ...] = (),
    level0: tuple[int, int] = (40000, 30000),
    features: np.ndarray | None = None,
) -> np.ndarray:
    """``coords_to_h5`` attributes, copied onto the features file by ``extract_features``."""
    attrs: dict[str, Any] = {
        "patch_size": patch_size,
        "patch_size_level0": patch_size * src_mag // target_mag,
        "level0_magnification": src_mag,
        "target_magnification": target_mag,
        "overlap": overlap,
        "name": path.stem,
        "savetodir": str(path.parent),
        "level0_width": level0[0],
        "level0_height": level0[1],
    }
    for key in drop:
        del attrs[key]
    feats = (
        np.random.default_rng(1).standard_normal((len(coords), D)).astype(np.float32)
        if features is None
        else np.asarray(features, np.float32)
    )
    save_hdf5(
        path,
        {"features": feats, "coords": np.asarray(coords, np.int64).reshape(-1, 2)},
        {
            "features": {"name": path.stem, "savetodir": str(path.parent), "encoder": "uni_v1"},
            "coords": attrs,
        },
        mode="w",
    )
    return feats
