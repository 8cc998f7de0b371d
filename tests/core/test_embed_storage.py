"""The HDF5 embeddings file: TRIDENT/CLAM layout, atomic writes, loading, matching."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from gpfm_core.embed.layout import (
    claim_slide_file,
    embeddings_path,
    features_dir,
    find_embeddings,
    stale_temps,
)
from gpfm_core.embed.loading import (
    EmbeddingsFileError,
    load_embeddings,
    matches,
    read_attrs,
)
from gpfm_core.embed.storage import EmbeddingWriter


def _grid(n_rows: int, n_cols: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    rc = np.array([(r, c) for r in range(n_rows) for c in range(n_cols)], dtype=np.int64).reshape(
        -1, 2
    )
    return rc[:, ::-1] * stride, rc


def _write(
    path: Path,
    n_rows: int = 3,
    n_cols: int = 4,
    d: int = 8,
    dtype: str = "float32",
    **attrs: object,
):
    coords, rc = _grid(n_rows, n_cols, 100)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((len(coords), d)).astype(np.float32)
    with EmbeddingWriter(
        path,
        coords=coords,
        grid_rc=rc,
        tissue_fraction=np.linspace(0, 1, len(coords)),
        embed_dim=d,
        dtype=dtype,
        attrs={
            "slide_id": "abc",
            "encoder": "enc",
            "requested_mpp": 0.5,
            "stride_level0": 100,
            **attrs,
        },
        coords_attrs={"patch_size": 224, "patch_size_level0": 100},
        features_attrs={"encoder": "enc"},
    ) as w:
        # out of order and in two pieces, as a threaded reader may deliver them
        order = rng.permutation(len(coords))
        for part in np.array_split(order, 3):
            w.write(part, feats[part])
        out = w.commit()
    return out, feats, coords, rc


def test_roundtrip_trident_reader(tmp_path: Path) -> None:
    out, feats, coords, rc = _write(tmp_path / "s.h5")
    assert out == tmp_path / "s.h5" and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no temporary file left
    with h5py.File(out, "r") as f:  # how TRIDENT / CLAM read it
        np.testing.assert_array_equal(f["features"][:], feats)
        np.testing.assert_array_equal(f["coords"][:], coords)
        assert f["coords"].dtype == np.int64 and f["features"].dtype == np.float32
        assert f["coords"].attrs["patch_size_level0"] == 100
        assert f["features"].attrs["encoder"] == "enc"
    emb = load_embeddings(out)
    np.testing.assert_array_equal(emb.features, feats)
    np.testing.assert_array_equal(emb.grid_rc, rc)
    assert emb.tissue_fraction is not None and emb.tissue_fraction.shape == (12,)
    assert len(emb) == 12 and emb.embed_dim == 8 and emb.encoder == "enc"
    assert emb.attrs["patch_size"] == 224 and emb.attrs["gpfm_format"] == 1


def test_float16_is_stored_and_loaded_as_float32(tmp_path: Path) -> None:
    out, feats, _, _ = _write(tmp_path / "s.h5", dtype="float16")
    with h5py.File(out, "r") as f:
        assert f["features"].dtype == np.float16
    emb = load_embeddings(out)
    assert emb.features.dtype == np.float32
    np.testing.assert_allclose(emb.features, feats, rtol=1e-3, atol=1e-3)


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "s.h5"
    coords, rc = _grid(2, 2, 10)
    with (
        pytest.raises(KeyboardInterrupt),
        EmbeddingWriter(
            final, coords=coords, grid_rc=rc, tissue_fraction=np.ones(4), embed_dim=3
        ) as w,
    ):
        w.write(np.array([0, 1]), np.ones((2, 3), np.float32))
        assert w.tmp.exists() and stale_temps(final) == [w.tmp]
        raise KeyboardInterrupt
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_commit_refuses_missing_rows(tmp_path: Path) -> None:
    coords, rc = _grid(2, 2, 10)
    with EmbeddingWriter(
        tmp_path / "s.h5", coords=coords, grid_rc=rc, tissue_fraction=np.ones(4), embed_dim=3
    ) as w:
        w.write(np.array([0, 2]), np.ones((2, 3), np.float32))
        with pytest.raises(RuntimeError, match="2 of 4 tiles were not written"):
            w.commit()
    assert list(tmp_path.iterdir()) == []


def test_temp_file_of_a_killed_writer_is_removed_under_the_lock(tmp_path: Path) -> None:
    # what a SIGKILLed writer leaves: atomic_path's temporary name beside the final one
    final = embeddings_path(tmp_path / "s.svs", tmp_path, slide_id="abc", **_KEY)
    final.parent.mkdir(parents=True)
    left = final.with_name(f".{final.name}.k1ll3d.tmp")
    left.write_bytes(b"half a file from a killed run")
    other = final.with_name(".t.h5.x.tmp")  # another slide's writer may be alive: untouched
    other.write_bytes(b"x")
    assert stale_temps(final) == [left]
    with claim_slide_file(final.parent, tmp_path / "s.svs", "abc") as path:
        assert path == final and not left.exists() and other.exists()
        out, feats, _, _ = _write(path)
    np.testing.assert_array_equal(load_embeddings(out).features, feats)


def test_empty_file_is_valid(tmp_path: Path) -> None:
    out, _, _, _ = _write(tmp_path / "e.h5", n_rows=0)
    with h5py.File(out, "r") as f:
        assert f["features"].shape == (0, 8) and f["coords"].shape == (0, 2)
    emb = load_embeddings(out)
    assert (
        emb.features.shape == (0, 8) and emb.coords.shape == (0, 2) and emb.grid_rc.shape == (0, 2)
    )


def test_wrong_shapes_and_dtype_are_refused(tmp_path: Path) -> None:
    coords, rc = _grid(1, 2, 10)
    with (
        EmbeddingWriter(
            tmp_path / "s.h5", coords=coords, grid_rc=rc, tissue_fraction=np.ones(2), embed_dim=3
        ) as w,
        pytest.raises(ValueError, match="do not fit"),
    ):
        w.write(np.array([0]), np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="float32"):
        EmbeddingWriter(
            tmp_path / "t.h5",
            coords=coords,
            grid_rc=rc,
            tissue_fraction=np.ones(2),
            embed_dim=3,
            dtype="int8",
        )


def test_load_a_trident_file_without_grid_rc(tmp_path: Path) -> None:
    # Written the way TRIDENT's save_h5 writes it: features + coords (int32), attrs on coords.
    p = tmp_path / "trident.h5"
    coords = np.array([[0, 0], [256, 0], [512, 256]], dtype=np.int32)
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=np.ones((3, 5), np.float32))
        c = f.create_dataset("coords", data=coords)
        c.attrs.update(
            {"patch_size": 256, "patch_size_level0": 256, "overlap": 0, "name": b"trident"}
        )
    emb = load_embeddings(p)
    np.testing.assert_array_equal(emb.grid_rc, [[0, 0], [0, 1], [1, 2]])
    assert emb.tissue_fraction is None and emb.attrs["name"] == "trident"


def test_bad_files_raise_one_line(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingsFileError, match="does not exist"):
        load_embeddings(tmp_path / "none.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(EmbeddingsFileError, match="not a readable HDF5"):
        read_attrs(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(EmbeddingsFileError, match="no 'features'"):
        load_embeddings(other)


_KEY = {"encoder": "enc", "weights_hash": "f00dcafe99", "mpp": 0.5, "tile_px": 224}


def test_find_embeddings_matches_slide_and_params(tmp_path: Path) -> None:
    slide = tmp_path / "slides" / "s.svs"  # the slide file itself is not opened: slide_id given
    emb = tmp_path / "emb"
    where = embeddings_path(slide, emb, slide_id="abc", **_KEY)
    assert where == emb / "0.5mpp_224px_0px_overlap" / "features_enc-f00dcafe" / "s.h5"
    assert where == features_dir(emb, **_KEY) / "s.h5"
    out, _, _, _ = _write(
        where, weights_hash="f00dcafe99", tile_px=224, overlap_px=0, min_tissue=0.25
    )
    find = lambda **kw: find_embeddings(slide, emb, **{"slide_id": "abc", **_KEY, **kw})  # noqa: E731
    assert find() == out
    assert find(min_tissue=0.25) == out and find(min_tissue=None) == out
    assert find(mpp=0.5 + 1e-9) == out
    assert find(min_tissue=0.5) is None  # a setting the path does not hold
    assert find(mpp=1.0) is None and find(weights_hash="other") is None  # other folders
    assert find(slide_id="other") is None
    assert find_embeddings(slide, tmp_path / "nowhere", slide_id="abc", **_KEY) is None


def test_matches_compares_floats_and_lists() -> None:
    attrs = {"a": 0.5, "b": [1, 2], "c": "x"}
    assert matches(attrs, a=0.5000000001, b=(1, 2), c="x", d=None)
    assert not matches(attrs, b=[1, 3])
    assert not matches(attrs, e=1)
