"""Which slide the cohort index means: names, duplicates, and builds that fail cleanly.

A cohort as ``gpfm embed`` leaves it: ``COHORT/cohort.csv`` naming each feature file by the
manifest's slide_id, two slides from two sites sharing the stem ``S01``, and two
byte-identical slides under two slide_ids. Every spelling a user may give picks the right
slide or is refused in one line; a duplicate is indexed once and its hits name both
slide_ids, by ``gpfm index build`` and by the incremental path ``gpfm embed`` uses.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpfm_core.cli import main
from gpfm_core.cohort import (
    CohortIndex,
    CohortIndexError,
    IndexFeeder,
    add_to_index,
    build_index,
    remove_from_index,
)
from gpfm_core.cohort.synth import clustered_features, write_feature_file
from gpfm_core.cohort.table import TableRow, update_table

D = 32
TILING = "0.5mpp_224px_0px_overlap/features_synthetic-00000000"
# slide_id -> (feature file, content id, features seed, tiles); case-005 is case-001's twin
SLIDES = {
    "case-001": ("S01.h5", "aaaa000000000001", 1, 60),
    "case-002": ("S01-bbbb0000.h5", "bbbb000000000002", 2, 50),
    "case-003": ("plain.h5", "cccc000000000003", 3, 40),
    "case-005": ("twin of one.h5", "aaaa000000000001", 1, 60),
}


def _feats(sid: str) -> np.ndarray:
    _, _, seed, n = SLIDES[sid]
    return clustered_features(n, D, seed=seed, n_clusters=6, latent_dim=4)


def _write(cohort: Path, sid: str) -> Path:
    """One slide's feature file as gpfm embed names it (stem-collisions get a hash suffix)."""
    name, content_id, _, _ = SLIDES[sid]
    path = write_feature_file(
        cohort / TILING / name,
        _feats(sid),
        slide_id=content_id,
        slide_path=cohort.parent / "slides" / f"{sid}.tif",
    )
    with h5py.File(path, "a") as f:  # gpfm embed's slide_name is the slide's stem
        f.attrs["slide_name"] = "S01" if sid in ("case-001", "case-002") else path.stem
    return path


def _cohort(root: Path, sids: list[str] | None = None, *, table: bool = True) -> list[Path]:
    sids = list(SLIDES) if sids is None else sids
    cohort = root / "cohort"
    files = [_write(cohort, s) for s in sids]
    if table:
        update_table(
            cohort,
            [TableRow.from_csv({"slide_id": s, "file": f"{TILING}/{SLIDES[s][0]}"}) for s in sids],
        )
    return files


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------- naming a slide


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> tuple[CohortIndex, Path]:
    root = tmp_path_factory.mktemp("named")
    _cohort(root, ["case-001", "case-002", "case-003"])
    res = build_index(root / "cohort")
    return CohortIndex.open(res.index_dir), root / "cohort" / TILING


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("case-001", "case-001"),  # the cohort table's slide_id
        ("case-002", "case-002"),
        ("S01-bbbb0000", "case-002"),  # the feature file's stem
        ("S01-bbbb0000.h5", "case-002"),  # its file name
        ("plain", "case-003"),  # the slide's name where it is unique
        ("aaaa000000000001", "case-001"),  # the content id
        ("cccc000000000003", "case-003"),
    ],
)
def test_each_spelling_queries_the_right_slide(
    named: tuple[CohortIndex, Path], ref: str, want: str
) -> None:
    idx, _ = named
    rec = idx.slide(ref)
    assert rec.cohort_slide_id == want and rec.file.name == SLIDES[want][0]
    # the tile queried is that slide's own tile 7 (float16 copy), and it finds itself
    np.testing.assert_allclose(idx.tile_features(ref, 7), _feats(want)[7], atol=2e-2)
    own = idx.search(idx.tile_features(ref, 7), 1)[0]
    assert (own.cohort_slide_ids, own.row) == ((want,), 7)


def test_a_feature_file_path_names_its_slide(named: tuple[CohortIndex, Path]) -> None:
    idx, folder = named
    assert idx.slide(folder / "S01.h5").cohort_slide_id == "case-001"
    assert idx.slide(str(folder / "S01-bbbb0000.h5")).cohort_slide_id == "case-002"


def test_an_ambiguous_name_is_refused_listing_the_candidates(
    named: tuple[CohortIndex, Path],
) -> None:
    idx, _ = named
    with pytest.raises(CohortIndexError) as e:
        idx.slide("S01")
    msg = _one_line(e)
    assert "'S01' names 2 slides" in msg
    for part in ("case-001 (S01.h5", "case-002 (S01-bbbb0000.h5", "case-001.tif", "slide_id"):
        assert part in msg, msg
    with pytest.raises(CohortIndexError) as e:
        idx.search_tile("S01", 0)
    with pytest.raises(CohortIndexError) as e:
        idx.slide("case-009")
    assert "no slide 'case-009'" in _one_line(e) and "case-001" in str(e.value)


def test_cli_query_and_info_name_slides_by_slide_id(
    named: tuple[CohortIndex, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    idx, folder = named
    cohort = folder.parent.parent
    capsys.readouterr()
    hits_csv = tmp_path / "hits.csv"
    args = ["index", "query", str(cohort), "--tile", "7", "-k", "3", "--csv", str(hits_csv)]
    assert main([*args, "--slide", "case-002"]) == 0
    out = capsys.readouterr().out
    assert "query: case-002 (S01) tile 7" in out
    rows = list(csv.DictReader(hits_csv.open()))
    want = idx.search_tile("case-002", 7, k=3)  # the same query through the API
    assert [(r["slide_id"], int(r["row"])) for r in rows] == [
        (h.cohort_slide_ids[0], h.row) for h in want
    ]
    ids = {"case-001": "aaaa000000000001", "case-002": "bbbb000000000002"}
    ids["case-003"] = "cccc000000000003"
    assert [r["content_id"] for r in rows] == [ids[r["slide_id"]] for r in rows]
    # an ambiguous name: exit 1, one line naming both candidates and how to pick one
    assert main([*args, "--slide", "S01"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case-001" in err[0] and "case-002" in err[0], err
    # info lists every slide with what tells them apart
    assert main(["index", "info", str(cohort)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(x for x in lines if "content id" in x)) + 1 :]
    assert [x.split()[0] for x in table] == ["case-001", "case-002", "case-003"]
    assert "S01-bbbb0000.h5" in table[1] and "bbbb000000000002" in table[1]


def test_slide_ids_follow_the_cohort_table(tmp_path: Path) -> None:
    files = _cohort(tmp_path, ["case-001", "case-003"], table=False)
    idx = CohortIndex.open(build_index(tmp_path / "cohort").index_dir)
    assert [s.cohort_slide_id for s in idx.slides] == ["", ""]  # no table: names only
    assert idx.slide("S01").file == files[0]
    update_table(
        tmp_path / "cohort",
        [TableRow.from_csv({"slide_id": "case-001", "file": f"{TILING}/S01.h5"})],
    )
    assert idx.refresh()  # the table changed: the names are re-read
    assert idx.slide("case-001").file == files[0]
    hit = idx.search(idx.tile_features("case-001", 3), 1)[0]
    assert hit.cohort_slide_ids == ("case-001",)


# ------------------------------------------------------------------- byte-identical slides


def _twin_checks(index_dir: Path) -> None:
    """case-001 and case-005 are one set of tiles, found under both slide_ids."""
    idx = CohortIndex.open(index_dir)
    assert sorted(s.cohort_slide_id for s in idx.slides) == [
        "case-001",
        "case-002",
        "case-003",
        "case-005",
    ]
    assert idx.slide("case-001").num == idx.slide("case-005").num
    assert idx.n_tiles == 60 + 50 + 40  # the twin's tiles count once
    assert len(list((index_dir / "slides").iterdir())) == 3 * 2  # features + coords, 3 sets
    feats = np.concatenate([_feats("case-001"), _feats("case-002"), _feats("case-003")])
    np.testing.assert_allclose(idx.mean, feats.mean(axis=0), atol=2e-4)  # not double-counted
    hit = idx.search(_feats("case-005")[11], 1)[0]
    assert (hit.cohort_slide_ids, hit.row) == (("case-001", "case-005"), 11)
    assert [s.cohort_slide_id for s in idx.twins("case-005")] == ["case-005", "case-001"]
    # "where else?" from one twin never returns the other's copy of the same tiles
    for h in idx.search_tile("case-005", 11, k=20, other_slides_only=True):
        assert "case-001" not in h.cohort_slide_ids


def test_build_indexes_byte_identical_slides_once_and_says_so(tmp_path: Path) -> None:
    _cohort(tmp_path)
    res = build_index(tmp_path / "cohort")
    assert res.added == ["S01", "S01", "plain", "twin of one"] and res.n_slides == 4
    assert len(res.notes) == 1 and "\n" not in res.notes[0]
    assert "case-005 (twin of one.h5)" in res.notes[0] and "case-001 (S01.h5)" in res.notes[0]
    _twin_checks(res.index_dir)


@pytest.mark.parametrize("how", ["add_to_index", "IndexFeeder"])
def test_incremental_adds_index_byte_identical_slides_the_same(tmp_path: Path, how: str) -> None:
    files = _cohort(tmp_path)
    index_dir = tmp_path / "cohort" / TILING / "gpfm_index"
    order = [files[0], files[3], files[1], files[2]]  # the twin right after its original
    if how == "IndexFeeder":  # what gpfm embed calls as each slide finishes
        feeder = IndexFeeder()
        for f in order:
            feeder(f)
        assert not feeder.errors
        (res,) = feeder.updates.values()
    else:
        results = [add_to_index(index_dir, f) for f in order]
        res = results[1]
        assert [r.added for r in results] == [["S01"], ["twin of one"], ["S01"], ["plain"]]
    assert len(res.notes) == 1 and "case-005" in res.notes[0] and "case-001" in res.notes[0]
    _twin_checks(index_dir)
    # a rerun changes nothing: both files are skipped as they are
    again = add_to_index(index_dir, files)
    assert sorted(again.skipped) == ["S01", "S01", "plain", "twin of one"]


def test_removing_or_reembedding_one_twin_keeps_the_other(tmp_path: Path) -> None:
    files = _cohort(tmp_path)
    index_dir = build_index(tmp_path / "cohort").index_dir
    # the content id names both twins: reading tiles is fine, removing is not
    assert CohortIndex.open(index_dir).slide("aaaa000000000001").cohort_slide_id == "case-001"
    with pytest.raises(CohortIndexError) as e:
        remove_from_index(index_dir, ["aaaa000000000001"])
    assert "names 2 slides" in _one_line(e)
    res = remove_from_index(index_dir, ["case-001"])
    assert res.removed == ["case-001"] and res.n_tiles == 150 and res.n_slides == 3
    idx = CohortIndex.open(index_dir)
    hit = idx.search(_feats("case-001")[4], 1)[0]
    assert (hit.cohort_slide_ids, hit.row, hit.file) == (("case-005",), 4, files[3])
    # case-005 re-embedded with other features: it gets its own tiles, the old ones go
    write_feature_file(files[3], _feats("case-002")[:30] + 1.0, slide_id="aaaa000000000001")
    assert add_to_index(index_dir, files[3]).replaced == ["twin of one"]
    idx.refresh()
    assert idx.n_tiles == 50 + 40 + 30 and idx.slide("case-005").n_tiles == 30
    assert len(list((index_dir / "slides").iterdir())) == 3 * 2


# ------------------------------------------------------------------- a failed build


@pytest.mark.parametrize("previous", [False, True])
def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, previous: bool) -> None:
    files = _cohort(tmp_path, ["case-001", "case-002", "case-003"])
    index_dir = tmp_path / "cohort" / TILING / "gpfm_index"
    if previous:
        build_index(files[:2], index_dir)
        manifest = (index_dir / "index.json").read_bytes()
        before = sorted(p.name for p in index_dir.rglob("*"))
    bad = _feats("case-003")
    bad[5, 3] = np.inf
    write_feature_file(files[2], bad, slide_id="cccc000000000003")  # the last one read
    with pytest.raises(CohortIndexError) as e:
        build_index(tmp_path / "cohort")
    assert "NaN or inf" in _one_line(e) and "plain.h5" in str(e.value)
    if previous:  # the old index as it was, not a file more
        assert (index_dir / "index.json").read_bytes() == manifest
        assert sorted(p.name for p in index_dir.rglob("*")) == before
        assert CohortIndex.open(index_dir).n_tiles == 110
    else:
        assert not index_dir.exists()
    # the first add of a new index fails the same way: no folder left
    other = tmp_path / "other_index"
    with pytest.raises(CohortIndexError):
        add_to_index(other, [files[0], files[2]])
    assert not other.exists()


# ------------------------------------------------------------------- gpfm embed, end to end


def test_a_cohort_gpfm_embed_accepts_is_indexed_and_queried_by_slide_id(
    cmu_svs: Path, small_pyramid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slides = tmp_path / "slides"
    for sub, src, name in [
        ("siteA", cmu_svs, "S01.svs"),
        ("siteB", small_pyramid, "S01.svs"),
        ("copies", cmu_svs, "copy of A.svs"),  # byte-identical to siteA/S01.svs
    ]:
        (slides / sub).mkdir(parents=True)
        shutil.copyfile(src, slides / sub / name)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,slide_id\n"
        f"{slides}/siteA/S01.svs,case-001\n"
        f"{slides}/siteB/S01.svs,case-002\n"
        f"{slides}/copies/copy of A.svs,case-005\n"
    )
    out = tmp_path / "cohort"
    embed = ["embed", str(manifest), "--encoder", "tiny-vit", "--mpp", "2", "--device", "cpu"]
    assert main([*embed, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    # gpfm embed indexed all three as they finished
    assert main(["index", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "slides:   3" in info
    assert all(s in info for s in ("case-001", "case-002", "case-005"))
    # and gpfm index build accepts the same cohort, saying what it did with the duplicate
    assert main(["index", "build", str(out), "--quiet"]) == 0
    built = capsys.readouterr().out
    assert "3 added; 3 slides" in built
    (note,) = [x for x in built.splitlines() if x.startswith("note:")]
    assert "case-005" in note and "case-001" in note
    idx = CohortIndex.open(next(out.rglob("gpfm_index")))
    a, b = idx.slide("case-001"), idx.slide("case-002")
    assert a.slide_path.endswith("siteA/S01.svs") and b.slide_path.endswith("siteB/S01.svs")
    assert a.name == b.name == "S01" and a.num == idx.slide("case-005").num != b.num
    for ref, want in [("case-001", a), ("case-002", b), (b.slide_id, b), (b.file.name, b)]:
        assert main(["index", "query", str(out), "--slide", ref, "--tile", "0", "-k", "2"]) == 0
        assert f"query: {want.cohort_slide_id} (S01) tile 0" in capsys.readouterr().out
    assert main(["index", "query", str(out), "--slide", "S01", "--tile", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case-001" in err[0] and "case-002" in err[0], err
    assert "siteA/S01.svs" in err[0] and "siteB/S01.svs" in err[0]
