"""The cohort-wide similarity index: real FAISS indices over real feature files.

Exactness of the re-rank, recall against an exhaustive search, incremental add / remove
(the other slides' files untouched), persistence, two processes adding at once, and bad
inputs refused in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpfm_core.analysis.similarity import center_features
from gpfm_core.cli import main
from gpfm_core.cohort import (
    CohortIndex,
    CohortIndexError,
    FeatureFilesError,
    add_to_index,
    build_index,
    remove_from_index,
)
from gpfm_core.cohort.synth import clustered_features, write_feature_file

D = 64
KW = {"n_clusters": 12, "latent_dim": 8}  # a small cohort: 12 tissue types, 8-d variation


def _feats(seed: int, n: int, dim: int = D) -> np.ndarray:
    return clustered_features(n, dim, seed=seed, **KW)


def _cohort(folder: Path, sizes: list[int], *, first_seed: int = 0, **attrs: object) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_feature_file(
            folder / f"slide{first_seed + i}.h5",
            _feats(first_seed + i, n),
            slide_id=f"id{first_seed + i:03d}",
            **attrs,  # type: ignore[arg-type]
        )
        for i, n in enumerate(sizes)
    ]


def _exact(features: np.ndarray, mean: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best centred cosines, computed from scratch in float64."""
    x = features.astype(np.float64) - mean
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    qc = q.astype(np.float64) - mean
    s = x @ (qc / np.linalg.norm(qc))
    return np.argsort(-s, kind="stable")[:k]


def _files_state(index_dir: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in sorted((index_dir / "slides").iterdir()):
        st = p.stat()
        out[p.name] = (st.st_ino, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------- exactness and recall


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[CohortIndex, np.ndarray]:
    """Six slides, 7,200 tiles, IVF-PQ trained (train_min below the cohort size)."""
    root = tmp_path_factory.mktemp("trained")
    files = _cohort(root / "feats", [1500, 1200, 1000, 1500, 1000, 1000])
    res = build_index(root / "feats", root / "index", train_min=4000)
    assert res.trained and res.n_tiles == 7200 and res.n_slides == 6
    all_feats = np.concatenate(
        [_feats(i, n) for i, n in enumerate([1500, 1200, 1000, 1500, 1000, 1000])]
    )
    assert len(files) == 6
    return CohortIndex.open(root / "index"), all_feats


def test_mean_is_the_cohort_mean(trained: tuple[CohortIndex, np.ndarray]) -> None:
    idx, feats = trained
    # float16 storage of (x - ref_mean): entries of ~1 carry ~5e-4 rounding, averaged away
    np.testing.assert_allclose(idx.mean, feats.mean(axis=0), atol=2e-4, rtol=0)


@pytest.mark.parametrize("n_cand", [20, 100, 400])
def test_rerank_is_exact_among_the_candidates(
    trained: tuple[CohortIndex, np.ndarray], n_cand: int
) -> None:
    idx, feats = trained
    offsets = np.cumsum([0] + [s.n_tiles for s in idx.slides])
    mean = feats.mean(axis=0)
    for t in (5, 1700, 6000):
        q = feats[t]
        cand = idx.candidates(q, n_cand)
        assert cand.size == n_cand and len(set(cand.tolist())) == n_cand
        # candidate id -> row of the concatenated original features
        nums = [s.num for s in idx.slides]
        glob = np.array([offsets[nums.index(int(c >> 32))] + int(c & 0xFFFFFFFF) for c in cand])
        want = glob[_exact(feats[glob], mean, q, 10)]
        ids, scores = idx.rerank(q, cand, 10)
        got = np.array([offsets[nums.index(int(c >> 32))] + int(c & 0xFFFFFFFF) for c in ids])
        x = feats[got] - mean
        exact_scores = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
            (q - mean) / np.linalg.norm(q - mean)
        )
        np.testing.assert_allclose(scores, exact_scores, atol=2e-3)  # float16 copy
        assert np.all(np.diff(scores) <= 0)
        # same set up to float16 near-ties: a swapped pair differs by less than 2e-3
        for g, w in zip(got, want, strict=True):
            if g != w:
                xs = (
                    center_features(feats[[g, w]], mean=mean, unit=True)[0]
                    @ center_features(q[None], mean=mean, unit=True)[0][0]
                )
                assert abs(xs[0] - xs[1]) < 2e-3


def test_recall_at_10_against_exhaustive_search(trained: tuple[CohortIndex, np.ndarray]) -> None:
    idx, feats = trained
    mean = feats.mean(axis=0)
    offsets = np.cumsum([0] + [s.n_tiles for s in idx.slides])
    rng = np.random.default_rng(7)
    queries = rng.choice(len(feats), 40, replace=False)
    hits = idx.search_batch(feats[queries], 10)
    recall = []
    for qi, hs in zip(queries, hits, strict=True):
        got = {offsets[[s.slide_id for s in idx.slides].index(h.slide_id)] + h.row for h in hs}
        want = set(_exact(feats, mean, feats[qi], 10).tolist())
        recall.append(len(got & want) / 10)
    assert np.mean(recall) >= 0.95, np.mean(recall)


def test_hits_carry_slide_tile_and_position(trained: tuple[CohortIndex, np.ndarray]) -> None:
    idx, _ = trained
    hits = idx.search_tile("slide2", 17, k=5)
    assert len(hits) == 5 and all(not (h.slide_name == "slide2" and h.row == 17) for h in hits)
    own = idx.search(idx.tile_features("slide2", 17), 1)[0]
    assert (own.slide_name, own.row, own.slide_id) == ("slide2", 17, "id002")
    assert own.score == pytest.approx(1.0, abs=1e-5)
    assert own.file.name == "slide2.h5"
    cols = int(np.ceil(np.sqrt(1000)))
    assert (own.x, own.y) == ((17 % cols) * 448, (17 // cols) * 448)
    assert idx.tile_at("slide2", own.x + 10, own.y + 440) == 17
    others = idx.search_tile("slide2", 17, k=20, other_slides_only=True)
    assert len(others) == 20 and all(h.slide_name != "slide2" for h in others)


# ------------------------------------------------------------------- incremental


def test_add_and_remove_touch_only_that_slide(tmp_path: Path) -> None:
    files = _cohort(tmp_path / "feats", [1200, 1200, 1200])
    index_dir = tmp_path / "index"
    build_index(files, index_dir, train_min=3000)
    idx = CohortIndex.open(index_dir)
    before = _files_state(index_dir)
    trained_file = next(index_dir.glob("ivfpq.*.faiss"))
    trained_stat = trained_file.stat().st_mtime_ns

    new = _cohort(tmp_path / "more", [900], first_seed=3)[0]
    res = idx.add(new)
    assert res.added == ["slide3"] and not res.trained and idx.n_tiles == 4500
    after = _files_state(index_dir)
    assert {k: after[k] for k in before} == before  # nothing of the other slides rewritten
    assert len(after) == len(before) + 3  # features, coords, codes of the new slide
    assert trained_file.stat().st_mtime_ns == trained_stat  # no retraining
    hit = idx.search(_feats(3, 900)[123], 1)[0]
    assert (hit.slide_name, hit.row) == ("slide3", 123)
    all4 = np.concatenate([_feats(i, n) for i, n in enumerate([1200, 1200, 1200, 900])])
    np.testing.assert_allclose(idx.mean, all4.mean(axis=0), atol=2e-4)

    res = idx.remove(["slide1"])
    assert res.removed == ["slide1"] and idx.n_tiles == 3300
    left = _files_state(index_dir)
    assert len(left) == len(after) - 3
    assert all(left[k] == after[k] for k in left)
    kept = np.concatenate([all4[:1200], all4[2400:]])
    np.testing.assert_allclose(idx.mean, kept.mean(axis=0), atol=2e-4)
    for h in idx.search_batch(all4[1200:1210], 10):  # slide1's own tiles: never found now
        assert all(x.slide_name != "slide1" for x in h)
    # the same answers from a fresh load
    again = CohortIndex.open(index_dir)
    q = all4[50]
    assert [(h.slide_id, h.row) for h in again.search(q, 10)] == [
        (h.slide_id, h.row) for h in idx.search(q, 10)
    ]


def test_incremental_from_empty_trains_once_when_big_enough(tmp_path: Path) -> None:
    files = _cohort(tmp_path / "feats", [800, 800, 800, 800])
    index_dir = tmp_path / "index"
    r1 = add_to_index(index_dir, files[0], train_min=2000)  # creates the index
    r2 = add_to_index(index_dir, files[1])
    assert r1.added == ["slide0"] and r2.added == ["slide1"] and not r2.trained
    flat = CohortIndex.open(index_dir)
    assert not flat.trained and not list(index_dir.glob("ivfpq.*.faiss"))
    q = _feats(1, 800)[5]
    # below train_min the candidate stage is exhaustive: the exact top 10
    mean = np.concatenate([_feats(0, 800), _feats(1, 800)]).mean(axis=0)
    want = _exact(np.concatenate([_feats(0, 800), _feats(1, 800)]), mean, q, 10)
    got = [(0 if h.slide_name == "slide0" else 800) + h.row for h in flat.search(q, 10)]
    assert got == want.tolist()
    r3 = add_to_index(index_dir, files[2])  # 2,400 tiles >= 2,000: trains now, once
    assert r3.trained and r3.n_tiles == 2400
    assert flat.refresh() and flat.trained and flat.params["n_train"] == 2400
    r4 = add_to_index(index_dir, files[3])
    assert not r4.trained and flat.refresh() and flat.params["n_train"] == 2400
    assert flat.search(_feats(3, 800)[9], 1)[0].slide_name == "slide3"


def test_readd_skips_unchanged_and_replaces_reembedded(tmp_path: Path) -> None:
    files = _cohort(tmp_path / "feats", [300, 300])
    index_dir = tmp_path / "index"
    build_index(tmp_path / "feats", index_dir)
    assert add_to_index(index_dir, tmp_path / "feats").skipped == ["slide0", "slide1"]
    os.utime(files[0])  # touched, same features: still skipped (content hash)
    assert add_to_index(index_dir, files[0]).skipped == ["slide0"]
    write_feature_file(files[1], _feats(99, 250), slide_id="id001")  # re-embedded
    res = add_to_index(index_dir, files[1])
    assert res.replaced == ["slide1"] and res.n_tiles == 550
    idx = CohortIndex.open(index_dir)
    assert [s.n_tiles for s in idx.slides] == [300, 250]
    assert idx.search(_feats(99, 250)[3], 1)[0].row == 3


# ------------------------------------------------------------------- two processes


def test_two_processes_adding_at_once(tmp_path: Path) -> None:
    files = _cohort(tmp_path / "feats", [400] * 8)
    index_dir = tmp_path / "index"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "gpfm_core", "index", "add", str(tmp_path)]
    procs = [
        subprocess.Popen(
            [*cmd, *map(str, part), "--index", str(index_dir), "--quiet"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part in (files[0::2], files[1::2])
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    idx = CohortIndex.open(index_dir)
    assert sorted(s.name for s in idx.slides) == [f"slide{i}" for i in range(8)]
    assert idx.n_tiles == 3200 and len({s.num for s in idx.slides}) == 8
    allf = np.concatenate([_feats(i, 400) for i in range(8)])
    np.testing.assert_allclose(idx.mean, allf.mean(axis=0), atol=2e-4)
    assert len(list((index_dir / "slides").iterdir())) == 8 * 2  # flat: no orphan files
    for i in range(8):
        assert idx.search(_feats(i, 400)[i], 1)[0].slide_name == f"slide{i}"


def test_refresh_sees_another_process_add(tmp_path: Path) -> None:
    files = _cohort(tmp_path / "feats", [300, 300])
    index_dir = tmp_path / "index"
    build_index(files[:1], index_dir)
    idx = CohortIndex.open(index_dir)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gpfm_core",
            "index",
            "add",
            str(tmp_path),
            str(files[1]),
            "--index",
            str(index_dir),
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )
    assert idx.n_tiles == 300 and idx.refresh() and idx.n_tiles == 600
    assert not idx.refresh()
    assert idx.search(_feats(1, 300)[0], 1)[0].slide_name == "slide1"


# ------------------------------------------------------------------- bad input


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_mixed_encoders_are_refused(tmp_path: Path) -> None:
    _cohort(tmp_path / "a", [50, 50])
    _cohort(tmp_path / "b", [50], first_seed=5, encoder="other-vit")
    with pytest.raises(FeatureFilesError) as e:
        build_index(tmp_path, tmp_path / "index")
    msg = _one_line(e)
    assert "2 encoders/tilings" in msg and "other-vit" in msg and "synthetic" in msg
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(
    ("attrs", "word"),
    [
        ({"encoder": "other-vit"}, "other-vit"),
        ({"weights_hash": "f" * 16}, "weights ffffffffffff"),
        ({"mpp": 1.0}, "1 µm/px"),
        ({"tile_px": 256}, "256 px"),
    ],
)
def test_add_of_another_group_changes_nothing(tmp_path: Path, attrs: dict, word: str) -> None:
    _cohort(tmp_path / "a", [60, 60])
    index_dir = tmp_path / "index"
    build_index(tmp_path / "a", index_dir)
    manifest = (index_dir / "index.json").read_bytes()
    ok = _cohort(tmp_path / "b", [40], first_seed=2)[0]
    bad = _cohort(tmp_path / "c", [40], first_seed=3, **attrs)[0]
    with pytest.raises(FeatureFilesError) as e:
        add_to_index(index_dir, [ok, bad])
    assert word in _one_line(e)
    assert (index_dir / "index.json").read_bytes() == manifest


def test_wrong_width_nan_and_missing(tmp_path: Path) -> None:
    _cohort(tmp_path / "a", [60])
    index_dir = tmp_path / "index"
    build_index(tmp_path / "a", index_dir)
    wide = write_feature_file(tmp_path / "w" / "wide.h5", _feats(1, 30, 96), slide_id="w")
    with pytest.raises(CohortIndexError) as e:
        add_to_index(index_dir, wide)
    assert "96-d" in _one_line(e) and "64-d" in str(e.value)
    nan = _feats(2, 30)
    nan[3, 4] = np.nan
    with pytest.raises(CohortIndexError) as e:
        add_to_index(index_dir, write_feature_file(tmp_path / "n" / "nan.h5", nan, slide_id="n"))
    assert "NaN" in _one_line(e)
    with pytest.raises(FeatureFilesError) as e:
        add_to_index(index_dir, tmp_path / "nowhere.h5")
    assert "does not exist" in _one_line(e)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "bad.h5").write_text("not hdf5")
    with pytest.raises(FeatureFilesError) as e:
        add_to_index(index_dir, tmp_path / "junk")
    assert "HDF5" in _one_line(e)
    with pytest.raises(CohortIndexError) as e:
        CohortIndex.open(tmp_path / "no-index")
    assert "no cohort index" in _one_line(e)
    idx = CohortIndex.open(index_dir)
    assert idx.n_tiles == 60
    with pytest.raises(CohortIndexError) as e:
        idx.search(np.zeros(10, np.float32))
    assert "64-d" in _one_line(e)
    with pytest.raises(CohortIndexError) as e:
        remove_from_index(index_dir, ["slide0", "nope"])
    assert "nope" in _one_line(e)
    assert CohortIndex.open(index_dir).n_tiles == 60  # nothing removed


def test_damaged_index_file_is_one_line(tmp_path: Path) -> None:
    _cohort(tmp_path / "a", [60])
    index_dir = tmp_path / "index"
    build_index(tmp_path / "a", index_dir)
    next((index_dir / "slides").glob("*.f16.npy")).unlink()
    with pytest.raises(CohortIndexError) as e:
        CohortIndex.open(index_dir)
    assert "rebuild" in _one_line(e)


# ------------------------------------------------------------------- CLI on real embeddings


def test_cli_on_files_from_gpfm_embed(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cohort = tmp_path / "cohort"
    assert (
        main(
            [
                "embed",
                str(cmu_svs),
                "--encoder",
                "tiny-vit",
                "--mpp",
                "2",
                "--out",
                str(cohort),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    second = cohort / "copy" / "other.h5"
    second.parent.mkdir()
    feats = _feats(1, 40)
    capsys.readouterr()
    assert main(["index", "build", str(cohort), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 added; 1 slides" in out and "exact" in out
    from gpfm_core.embed import load_embeddings

    emb = load_embeddings(next(cohort.rglob("cmu_small_region.h5")))
    x, y = (int(v) + 5 for v in emb.coords[3])
    assert (
        main(
            [
                "index",
                "query",
                str(cohort),
                "--slide",
                "cmu_small_region",
                "--xy",
                str(x),
                str(y),
                "-k",
                "4",
                "--csv",
                str(tmp_path / "hits.csv"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "query: cmu_small_region tile 3" in out
    lines = (tmp_path / "hits.csv").read_text().splitlines()
    assert lines[0].startswith("rank,score,slide_id") and len(lines) == 5
    # the hits are the exact top 4 (a small index: exhaustive candidates); compared by
    # score, so float16 near-ties between look-alike tiles may swap places
    c = center_features(emb.features, mean=emb.features.mean(axis=0), unit=True)[0]
    exact = np.sort(np.delete(c @ c[3], 3))[::-1][:4]
    np.testing.assert_allclose([float(r.split(",")[1]) for r in lines[1:]], exact, atol=2e-3)
    assert 3 not in [int(r.split(",")[5]) for r in lines[1:]]
    # a file from another encoder: refused with one line, exit status 1
    write_feature_file(second, feats, slide_id="x")
    assert main(["index", "add", str(cohort), str(second)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny-vit" in err[0] and "synthetic" in err[0]
    assert main(["index", "info", str(cohort)]) == 0
    assert f"slides:   1, tiles: {len(emb)}" in capsys.readouterr().out


# ------------------------------------------------------------------- one index per feature set


def _embed(slides: list[Path], out: Path, mpp: float, *extra: str) -> int:
    args = ["embed", *map(str, slides), "--encoder", "tiny-vit", "--mpp", str(mpp)]
    return main([*args, "--device", "cpu", "--out", str(out), "--quiet", *extra])


def test_gpfm_embed_indexes_each_feature_set_and_index_cli_finds_it(
    cmu_svs: Path, small_pyramid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpfm_core.cohort import feature_sets, find_index, index_group

    out = tmp_path / "cohort"
    slides = [cmu_svs, small_pyramid]
    # a cohort (two slides): indexed as they finish, in the feature folder's own gpfm_index
    assert _embed(slides, out, 2) == 0
    (set2,) = feature_sets(out)
    assert set2.parent.name == "2mpp_112px_0px_overlap" and set2.name.startswith("features_tiny")
    idx = CohortIndex.open(set2 / "gpfm_index")
    assert len(idx.slides) == 2 and find_index(out) == set2 / "gpfm_index"
    # another tiling, --no-index: its folder gets no index; one slide alone: no index either
    assert _embed(slides, out, 4, "--no-index") == 0
    assert _embed([cmu_svs], out, 8) == 0
    sets = feature_sets(out)
    assert [s.parent.name.split("mpp")[0] for s in sets] == ["2", "4", "8"]
    assert [(s / "gpfm_index").exists() for s in sets] == [True, False, False]
    capsys.readouterr()
    assert main(["index", "info", str(out)]) == 0  # the one index there
    assert "slides:   2" in capsys.readouterr().out

    # build over the output folder: one index per feature set (never one over a mix)
    assert main(["index", "build", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("added" in line for line in lines) == 3
    assert all((s / "gpfm_index" / "index.json").is_file() for s in sets)
    assert [index_group(s / "gpfm_index").mpp for s in sets] == [2.0, 4.0, 8.0]
    # query / info need one: the folder's three are named in one line, with the way out
    for action in (["info"], ["query", "--slide", "cmu_small_region", "--tile", "0"]):
        assert main(["index", action[0], str(out), *action[1:]]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "3 indexes" in err[0], err
        assert all(s.relative_to(out).as_posix() in err[0] for s in sets)
    assert main(["index", "info", str(sets[1])]) == 0  # a feature folder names its index
    assert "4 µm/px" in capsys.readouterr().out
    # the dock's way: the index of the open slide's encoder, weights and tiling
    g = index_group(sets[2] / "gpfm_index")
    assert find_index(out, group=g) == sets[2] / "gpfm_index"
    with pytest.raises(CohortIndexError) as e:
        find_index(out, group=type(g)(g.encoder, g.weights_hash, 96, g.mpp, 0))
    assert "no index of" in _one_line(e) and "96 px" in _one_line(e)


def test_an_index_that_cannot_be_written_is_one_line_and_embedding_goes_on(
    cmu_svs: Path, small_pyramid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cohort"
    assert _embed([cmu_svs], out, 4, "--no-index") == 0
    (folder,) = (p.parent for p in out.rglob("*.h5"))
    (folder / "gpfm_index").write_text("in the way")  # a file where the index folder goes
    capsys.readouterr()
    assert _embed([cmu_svs, small_pyramid], out, 4) == 1
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if "index" in line]
    assert len(err) == 1 and "not updated" in err[0] and "gpfm index add" in err[0], err
    assert "1 embedded, 1 skipped" in captured.out  # the slides are done all the same
    assert len(list(folder.glob("*.h5"))) == 2 and (folder / "gpfm_index").is_file()
