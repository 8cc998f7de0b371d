"""Slide names and feature-file names of a cohort: one row per slide_id, names from the inputs.

Real generated pyramids (OpenSlide), real tiny-vit; no mocks. The same names on a real
LocalCluster: ``test_cohort_run.py::test_same_stem_file_names_follow_the_input_order``.

- A slide file replaced in place supersedes its old row (and file): never two rows of one
  slide_id, and ``open_cohort`` / ``export-anndata`` refuse a table that has them.
- Default slide_ids are the feature files' stems (``S01``, then ``S01-<id8>``), which
  ``gpfm train-mil`` / ``gpfm eval`` look files up by.
- Which same-stem slide gets the bare ``S01.h5`` is decided by the inputs' order, not by
  which slide a cluster finishes first.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpfm_core.cli import main
from gpfm_core.cohort import (
    EmbedSettings,
    export_anndata,
    open_cohort,
    read_cohort_inputs,
    read_table,
    run_cohort,
)
from gpfm_core.cohort.index import index_dir_for
from gpfm_core.cohort.store import CohortError
from gpfm_core.cohort.table import SupersededWarning, table_path
from gpfm_core.errors import GpfmError
from gpfm_core.slide import open_slide

SETTINGS = EmbedSettings(encoder="tiny-vit", mpp=1.0, batch_size=8, device="cpu", workers=1)


def _content_id(path: Path) -> str:
    with open_slide(path) as slide:
        return slide.info.slide_id


@pytest.fixture(scope="module")
def three_slides(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> list[Path]:
    """Three different small pyramids (0.5 µm/px, 6 to 48 tissue tiles at 1 µm/px)."""
    from gpfm_core.synth import make_synthetic_slide

    d = tmp_path_factory.mktemp("name_slides")
    sources = [data_dir / "cmu_small_region.svs", data_dir / "he_patch_1000.png"]
    sizes = [(2048, 1536), (1024, 768), (1280, 1024)]
    return [
        make_synthetic_slide(
            d / f"src{i}.svs", width=w, height=h, mpp=0.5, tile=256, seed=i, sources=sources
        )
        for i, (w, h) in enumerate(sizes)
    ]


def _sites(tmp_path: Path, first: Path, second: Path) -> tuple[Path, Path]:
    """``siteA/S01.svs`` and ``siteB/S01.svs``: two slides with one stem."""
    a, b = tmp_path / "siteA" / "S01.svs", tmp_path / "siteB" / "S01.svs"
    for src, dst in ((first, a), (second, b)):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return a, b


def _ids_and_files(out: Path) -> list[tuple[str, str]]:
    return sorted((r.slide_id, Path(r.file).name) for r in read_table(out))


def test_a_slide_replaced_in_place_supersedes_its_row_and_file(
    three_slides: list[Path], tmp_path: Path
) -> None:
    a, b = _sites(tmp_path, three_slides[0], three_slides[1])
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"path,slide_id,mpp\n{a},case-001,\n{b},case-002,0.5\n")
    out = tmp_path / "out"
    run_cohort(read_cohort_inputs([manifest]), out_dir=out, settings=SETTINGS)
    old_id, new_id = _content_id(b), _content_id(three_slides[2])
    old_file = f"S01-{old_id[:8]}.h5"
    assert _ids_and_files(out) == [("case-001", "S01.h5"), ("case-002", old_file)]

    shutil.copyfile(three_slides[2], b)  # the user overwrites siteB/S01.svs with another slide
    with pytest.warns(SupersededWarning) as caught:
        run = run_cohort(read_cohort_inputs([manifest]), out_dir=out, settings=SETTINGS)
    assert [r.status for r in run.reports] == ["skipped", "embedded"]
    (msg,) = [str(w.message) for w in caught if w.category is SupersededWarning]
    assert old_file in msg and "case-002" in msg and "\n" not in msg
    rows = {r.slide_id: r for r in read_table(out)}
    assert _ids_and_files(out) == [("case-001", "S01.h5"), ("case-002", f"S01-{new_id[:8]}.h5")]
    assert rows["case-002"].content_id == new_id
    assert not any(p.name == old_file for p in out.rglob("*.h5"))  # the stale file is removed
    cohort = open_cohort(out)
    assert cohort.slides == ["case-001", "case-002"]
    with h5py.File(cohort.path("case-002"), "r") as f:
        assert f.attrs["slide_id"] == new_id
    adata = export_anndata(cohort, tmp_path / "t.h5ad")
    import anndata

    obs = anndata.read_h5ad(adata).obs
    assert list(obs["slide"].cat.categories) == ["case-001", "case-002"]
    assert (obs["slide"] == "case-002").sum() == rows["case-002"].n_tiles


def test_a_table_with_two_rows_of_one_slide_is_refused_in_one_line(
    three_slides: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    run_cohort(read_cohort_inputs(three_slides[1:]), out_dir=out, settings=SETTINGS)
    # a hand edit (or an older gpfm) gives slide src2's name to src1's row too
    lines = table_path(out).read_text().splitlines()
    dup = next(line for line in lines if line.startswith("src1,")).replace("src1,", "src2,", 1)
    table_path(out).write_text("\n".join([*lines, dup]) + "\n")
    with pytest.raises(CohortError) as info:
        open_cohort(out)
    msg = str(info.value)
    assert "slide_id 'src2' has 2 rows" in msg and "\n" not in msg
    capsys.readouterr()
    assert main(["export-anndata", str(out), "--out", str(tmp_path / "t.h5ad")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpfm export-anndata: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "t.h5ad").exists()


def test_export_anndata_refuses_a_slide_asked_for_twice(
    three_slides: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_cohort(read_cohort_inputs(three_slides[1:2]), out_dir=out, settings=SETTINGS)
    with pytest.raises(CohortError, match="'src1' is asked for twice"):
        export_anndata(out, tmp_path / "t.h5ad", slides=["src1", "src1"])


def test_default_slide_ids_are_file_stems_the_other_tools_accept(
    three_slides: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpfm_core.evaluation.features import find_slide_features

    a, b = _sites(tmp_path, three_slides[1], three_slides[2])
    out = tmp_path / "out"
    args = ["embed", str(a), str(b), "--encoder", "tiny-vit", "--mpp", "1", "--out", str(out)]
    assert main([*args, "--device", "cpu", "--quiet"]) == 0
    id_b = f"S01-{_content_id(b)[:8]}"
    # a stem when unique; the later same-stem slide is <stem>-<id8>, as its file is named
    assert _ids_and_files(out) == [("S01", "S01.h5"), (id_b, f"{id_b}.h5")]
    rows = {r.slide_id: r for r in read_table(out)}
    assert rows["S01"].slide_path == str(a) and rows[id_b].slide_path == str(b)
    # train-mil / eval find a slide's file by its slide_id: the right slide's file
    files = find_slide_features(out, ["S01", id_b])
    for sid, path in files.items():
        with h5py.File(path, "r") as f:
            assert f.attrs["slide_id"] == rows[sid].content_id
    import anndata

    obs = anndata.read_h5ad(export_anndata(out, tmp_path / "t.h5ad")).obs
    assert sorted(obs["slide"].cat.categories) == ["S01", id_b]
    # a later run with another S01 alone: another slide, not a new version of siteA's
    c = tmp_path / "siteC" / "S01.svs"
    c.parent.mkdir()
    shutil.copyfile(three_slides[0], c)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SupersededWarning)  # nothing is superseded
        assert main(["embed", str(c), "--encoder", "tiny-vit", "--mpp", "1", "--out", str(out),
                     "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    id_c = f"S01-{_content_id(c)[:8]}"
    assert _ids_and_files(out) == sorted(
        [("S01", "S01.h5"), (id_b, f"{id_b}.h5"), (id_c, f"{id_c}.h5")]
    )


def test_train_mil_finds_a_manifest_cohorts_files_by_their_slide_ids(
    three_slides: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpfm_core.embed import load_embeddings
    from gpfm_core.evaluation.features import find_slide_features
    from gpfm_core.evaluation.mil import SlideModel

    a, b = _sites(tmp_path, three_slides[0], three_slides[1])
    c = tmp_path / "siteC" / "T07.svs"
    c.parent.mkdir()
    shutil.copyfile(three_slides[2], c)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,slide_id\n{a},case-001\n{b},case-002\n{c},case-003\n")
    out = tmp_path / "out"
    args = ["embed", str(manifest), "--encoder", "tiny-vit", "--mpp", "1", "--out", str(out)]
    assert main([*args, "--device", "cpu", "--quiet", "--no-index"]) == 0
    rows = {r.slide_id: r for r in read_table(out)}
    assert sorted(rows) == ["case-001", "case-002", "case-003"]
    (features_dir,) = {r.path_in(out).parent for r in rows.values()}
    ids = ["case-001", "case-002", "case-003"]
    # the --out folder or its features folder: each slide_id is the file the table names
    for folder in (out, features_dir):
        files = find_slide_features(folder, ids)
        assert sorted(files) == ids
        for sid, path in files.items():
            assert path.resolve() == rows[sid].path_in(out).resolve()
            with h5py.File(rows[sid].path_in(out), "r") as f:
                assert load_embeddings(path).attrs["slide_id"] == rows[sid].content_id
                np.testing.assert_array_equal(load_embeddings(path).features, f["features"][:])
    # the stem still finds a file no table names by it; an id in neither is one line
    assert find_slide_features(out, ["T07"])["T07"].name == "T07.h5"
    with pytest.raises(GpfmError) as info:
        find_slide_features(out, ["case-001", "case-009"])
    assert "case-009" in str(info.value) and "\n" not in str(info.value)
    # gpfm train-mil with the manifest's slide_ids: each bag is the right slide's features
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide_id,label,split\ncase-001,low,train\ncase-002,high,train\ncase-003,low,val\n"
    )
    model = tmp_path / "model.safetensors"
    argv = ["train-mil", str(labels), "--features", str(out), "--out", str(model),
            "--classes", "low,high", "--epochs", "2", "--patience", "1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert SlideModel.load(model, embed_dim=64).training["n_val"] == 1


def _query_files(index_dir: Path) -> tuple[list[Path], set[Path]]:
    """The index's slide files, and the files of every tile a query of all tiles returns."""
    from gpfm_core.cohort.index import CohortIndex

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the index itself lists no deleted file
        idx = CohortIndex.open(index_dir)
    first = idx.slides[0]
    hits = idx.search_tile(first.file, 0, k=idx.n_tiles)
    assert len(hits) == idx.n_tiles - 1  # every other tile: nothing hidden, nothing extra
    return sorted(r.file for r in idx.slides), {h.file for h in hits}


def test_a_superseded_slide_leaves_the_cohort_index_in_the_same_run(
    three_slides: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _sites(tmp_path, three_slides[0], three_slides[1])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,slide_id\n{a},case-001\n{b},case-002\n")
    out = tmp_path / "out"
    argv = ["embed", str(manifest), "--encoder", "tiny-vit", "--mpp", "1", "--out", str(out),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0  # a manifest: the index is kept by default
    old = {r.slide_id: r.path_in(out).resolve() for r in read_table(out)}
    index_dir = index_dir_for(old["case-001"])
    assert _query_files(index_dir)[0] == sorted(old.values())

    shutil.copyfile(three_slides[2], b)  # siteB/S01.svs replaced in place by another slide
    with pytest.warns(SupersededWarning):
        assert main(argv) == 0
    assert "1 removed" in capsys.readouterr().out
    new = {r.slide_id: r.path_in(out).resolve() for r in read_table(out)}
    assert new["case-002"] != old["case-002"] and not old["case-002"].exists()
    files, hit_files = _query_files(index_dir)
    assert files == sorted(new.values())  # the index lists exactly the table's files
    assert hit_files == set(new.values()) and old["case-002"] not in hit_files


def test_an_index_listing_a_deleted_file_leaves_it_out_and_says_how_to_drop_it(
    three_slides: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpfm_core.cohort.index import CohortIndex

    out = tmp_path / "out"
    run_cohort(read_cohort_inputs(three_slides), out_dir=out, settings=SETTINGS, index=True)
    rows = {r.slide_id: r for r in read_table(out)}
    index_dir = index_dir_for(rows["src0"].path_in(out))
    full = CohortIndex.open(index_dir)
    gone = rows["src1"].path_in(out).resolve()
    gone.unlink()  # deleted by hand: the index still lists it
    with pytest.warns(UserWarning, match="gpfm index remove") as caught:
        idx = CohortIndex.open(index_dir)
    (msg,) = [str(w.message) for w in caught if "gpfm index remove" in str(w.message)]
    assert str(gone) in msg and "\n" not in msg
    assert sorted(r.file for r in idx.slides) == sorted(
        rows[s].path_in(out).resolve() for s in ("src0", "src2")
    )
    assert idx.n_tiles == full.n_tiles - rows["src1"].n_tiles
    hits = idx.search_tile(idx.slides[0].file, 0, k=full.n_tiles)
    assert len(hits) == idx.n_tiles - 1 and gone not in {h.file for h in hits}
    # the open index that saw it before catches up on refresh
    with pytest.warns(UserWarning, match="gpfm index remove"):
        full.refresh()
    assert gone not in {r.file for r in full.slides}
    # the command the line names drops it from the index itself; then no warning
    remove = msg.split("drop them with gpfm ")[1].split()
    assert main(remove) == 0
    assert "1 removed" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(CohortIndex.open(index_dir).slides) == 2


def test_a_moved_slide_keeps_its_name_and_file(three_slides: list[Path], tmp_path: Path) -> None:
    """The same slide by another path (moved, copied) is not a new slide: no S01-<id8>."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(three_slides[0], a / "S01.svs")
    out = tmp_path / "out"
    first = run_cohort(read_cohort_inputs([a / "S01.svs"]), out_dir=out, settings=SETTINGS)
    (file,) = [r.file for r in first.reports]
    shutil.move(a / "S01.svs", b / "S01.svs")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SupersededWarning)  # nothing superseded
        second = run_cohort(read_cohort_inputs([b / "S01.svs"]), out_dir=out, settings=SETTINGS)
    (report,) = second.reports
    assert report.slide_id == "S01" and report.file == file and report.status == "reused"
    (row,) = read_table(out)
    assert (row.slide_id, Path(row.file).name) == ("S01", "S01.h5")
    assert row.slide_path == str((b / "S01.svs").resolve())
