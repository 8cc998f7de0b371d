"""A cohort store people can use from anything (issue 11, item 2): table, lazy memory-mapped
features, AnnData export. Real slides embedded by tiny-vit, real h5py and anndata."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpfm_core.cli import main
from gpfm_core.cohort import (
    CohortError,
    EmbedSettings,
    export_anndata,
    open_cohort,
    read_cohort_inputs,
    read_features,
    read_table,
    run_cohort,
)
from gpfm_core.embed import load_embeddings

SETTINGS = EmbedSettings(encoder="tiny-vit", mpp=1.0, batch_size=16, device="cpu", workers=1)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Three slides (the CMU sample and two generated pyramids) embedded inline."""
    from gpfm_core.synth import make_synthetic_slide

    d = tmp_path_factory.mktemp("store")
    sources = [data_dir / "cmu_small_region.svs", data_dir / "he_patch_1000.png"]
    slides = [
        make_synthetic_slide(d / f"gen{i}.svs", width=w, height=h, mpp=0.5, tile=256, seed=i,
                             sources=sources)
        for i, (w, h) in enumerate([(1536, 1024), (1024, 1024)])
    ]  # fmt: skip
    manifest = d / "cohort.csv"
    manifest.write_text(
        "path,slide_id\n"
        f"{data_dir / 'cmu_small_region.svs'},CMU\n{slides[0]},case-A\n{slides[1]},case-B\n"
    )
    out = d / "cohort"
    done: list[Path] = []  # the hook the cohort index's incremental add connects to
    run = run_cohort(
        read_cohort_inputs([manifest]), out_dir=out, settings=SETTINGS, on_slide_done=done.append
    )
    assert [r.status for r in run.reports] == ["embedded"] * 3
    assert done == [Path(r.file) for r in run.reports] and all(p.is_file() for p in done)
    return out


def test_cohort_table_describes_every_file(cohort_dir: Path) -> None:
    rows = {r.slide_id: r for r in read_table(cohort_dir)}
    assert sorted(rows) == ["CMU", "case-A", "case-B"]
    for row in rows.values():
        path = row.path_in(cohort_dir)
        emb = load_embeddings(path)
        assert row.n_tiles == len(emb) > 0 and row.embed_dim == emb.embed_dim == 64
        assert row.encoder == "tiny-vit" and row.weights_hash == emb.attrs["weights_hash"]
        assert row.tiling == "1mpp_112px_0px_overlap" and row.mpp == 1.0 and row.tile_px == 112
        assert row.content_id == emb.attrs["slide_id"] and len(row.content_id) == 16
        assert row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row.file == path.relative_to(cohort_dir).as_posix()


def test_open_cohort_is_lazy_and_memory_maps_features(cohort_dir: Path) -> None:
    cohort = open_cohort(cohort_dir)
    assert cohort.slides == ["CMU", "case-A", "case-B"] and "CMU" in cohort
    assert cohort.n_tiles == sum(r.n_tiles for r in read_table(cohort_dir))
    for slide in cohort:
        x = cohort.features(slide)
        emb = cohort.load(slide)
        assert isinstance(x, np.memmap) and not x.flags.writeable
        np.testing.assert_array_equal(x, emb.features)
        np.testing.assert_array_equal(cohort.coords(slide), emb.coords)
        with h5py.File(cohort.path(slide), "r") as f:
            assert f["features"].chunks is None  # the writer stores features contiguous
    assert [s for s, _ in cohort.iter_features()] == cohort.slides
    assert list(cohort.to_pandas()["slide_id"]) == cohort.slides
    with pytest.raises(CohortError, match="no slide 'nope'"):
        cohort.features("nope")


@pytest.mark.parametrize(
    ("kwargs", "mapped"),
    [
        ({"dtype": "float16"}, True),  # --fp16 files map as float16
        ({"dtype": "float32", "chunks": (4, 64), "compression": "gzip"}, False),  # read instead
        ({"dtype": "float32", "chunks": (4, 64)}, False),
    ],
)
def test_read_features_maps_contiguous_and_reads_chunked(
    tmp_path: Path, kwargs: dict, mapped: bool
) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(10, 64)).astype(kwargs["dtype"])
    p = tmp_path / "f.h5"
    with h5py.File(p, "w") as f:  # a TRIDENT-like file of another writer
        f.create_dataset("features", data=data, **{k: v for k, v in kwargs.items() if k != "dtype"})
    x = read_features(p)
    assert isinstance(x, np.memmap) is mapped and x.dtype == data.dtype
    np.testing.assert_array_equal(x, data)
    np.testing.assert_array_equal(read_features(p, mmap=False), data)


def test_open_cohort_picks_one_feature_set_or_says_how(cohort_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="no cohort table"):
        open_cohort(tmp_path)
    # a second tiling of the same slides into the same folder
    entries = [e for e in read_cohort_inputs([cohort_dir.parent / "cohort.csv"])][:1]
    run_cohort(entries, out_dir=cohort_dir, settings=EmbedSettings(
        encoder="tiny-vit", mpp=2.0, device="cpu", workers=1))  # fmt: skip
    try:
        with pytest.raises(CohortError, match="2 feature sets") as info:
            open_cohort(cohort_dir)
        assert "tiling=" in str(info.value) and "\n" not in str(info.value)
        assert open_cohort(cohort_dir, tiling="2mpp_112px_0px_overlap").slides == ["CMU"]
        assert len(open_cohort(cohort_dir, tiling="1mpp_112px_0px_overlap")) == 3
        with pytest.raises(CohortError, match="no features"):
            open_cohort(cohort_dir, encoder="gpfm")
    finally:  # leave the module's cohort as it was
        for f in (cohort_dir / "2mpp_112px_0px_overlap").rglob("*.h5"):
            f.unlink()
        from gpfm_core.cohort import update_table

        update_table(cohort_dir, [])
    assert len(open_cohort(cohort_dir)) == 3


def test_export_anndata_tiles_by_features(cohort_dir: Path, tmp_path: Path) -> None:
    anndata = pytest.importorskip("anndata")  # a core dependency: present in CI
    from gpfm_core.analysis import LinearProbe

    cohort = open_cohort(cohort_dir)
    feats = np.concatenate([np.asarray(cohort.features(s)) for s in cohort])
    coords = np.concatenate([cohort.coords(s) for s in cohort])
    labels = (coords[:, 0] > np.median(coords[:, 0])).astype(np.int64)
    probe = LinearProbe(encoder="tiny-vit")
    probe.fit(feats, labels, class_names=["left", "right"], cv_folds=2)
    probe_path = probe.save(tmp_path / "probe.safetensors")

    out = export_anndata(cohort_dir, tmp_path / "tiles.h5ad", clusters=3, probe=probe_path)
    a = anndata.read_h5ad(out)
    assert a.shape == (cohort.n_tiles, 64)
    np.testing.assert_array_equal(np.asarray(a.X), feats)
    np.testing.assert_array_equal(a.obs[["x", "y"]].to_numpy(), coords)
    assert list(a.obs["slide"].cat.categories) == cohort.slides
    assert (a.obs["slide"] == "case-A").sum() == cohort.row("case-A").n_tiles
    assert a.obs_names[0] == "CMU:0" and a.var_names[-1] == "f63"
    side = load_embeddings(cohort.path("CMU")).attrs["tile_size_level0"]
    np.testing.assert_allclose(a.obsm["spatial"], coords + side / 2)
    assert sorted(a.obs["cluster"].unique()) == ["0", "1", "2"]
    pred, conf = probe.predict(feats)
    assert list(a.obs["prediction"]) == [["left", "right"][i] for i in pred]
    np.testing.assert_allclose(a.obs["confidence"].to_numpy(), conf, rtol=1e-5)
    assert a.uns["gpfm"]["encoder"] == "tiny-vit"
    assert list(a.uns["gpfm_slides"].index) == cohort.slides

    sub = tmp_path / "sub.h5ad"
    assert main(["export-anndata", str(cohort_dir), "--out", str(sub), "--slides", "case-B"]) == 0
    b = anndata.read_h5ad(sub)
    np.testing.assert_array_equal(np.asarray(b.X), cohort.features("case-B"))
    assert set(b.obs["slide"]) == {"case-B"} and "cluster" not in b.obs
    assert not list(tmp_path.glob(".*.tmp"))
