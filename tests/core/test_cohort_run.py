"""Cohort embedding on dask.distributed (issue 11, item 1): real LocalClusters, real slides.

No mocks: real worker processes (one is killed with SIGKILL mid-slide), real worker threads,
two real ``gpfm embed`` processes at once, real OpenSlide on generated pyramids, tiny-vit.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpfm_core.cli import main
from gpfm_core.cohort import EmbedSettings, read_cohort_inputs, read_table, run_cohort
from gpfm_core.cohort.run import read_report
from gpfm_core.tiling import NoTissueWarning

distributed = pytest.importorskip("distributed")  # a core dependency: present in CI

MPP = 1.0  # tiny-vit reads 112 px tiles: 112 µm each
SETTINGS = EmbedSettings(encoder="tiny-vit", mpp=MPP, batch_size=8, device="cpu", workers=1)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
SIZES = [(1024, 768), (1536, 1024), (768, 768), (2048, 1024), (1280, 1280), (1024, 1536)]


@pytest.fixture(scope="module")
def cohort_slides(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> list[Path]:
    """Six generated pyramids of mixed sizes (0.5 µm/px): 6 to 25 tissue tiles each."""
    from gpfm_core.synth import make_synthetic_slide

    d = tmp_path_factory.mktemp("cohort_slides")
    sources = [data_dir / "cmu_small_region.svs", data_dir / "he_patch_1000.png"]
    return [
        make_synthetic_slide(
            d / f"case{i}.svs", width=w, height=h, mpp=0.5, tile=256, seed=i, sources=sources
        )
        for i, (w, h) in enumerate(SIZES)
    ]


def _manifest(path: Path, slides: list[Path], extra: list[str] | None = None) -> Path:
    rows = ["path,slide_id"] + [f"{s},id-{s.stem}" for s in slides] + (extra or [])
    path.write_text("\n".join(rows) + "\n")
    return path


def _h5_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.h5"))


def _assert_complete(out: Path) -> None:
    """Every feature file is whole: all rows written, none left as a temporary file."""
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    rows = {r.file: r for r in read_table(out)}
    for path in _h5_files(out):
        with h5py.File(path, "r") as f:
            feats = f["features"][:]
            n = int(f.attrs["n_tiles"])
        assert feats.shape == (n, 64) and n > 0
        # rows never written stay 0 in HDF5: a half file would have all-zero rows
        assert np.all(np.abs(feats).sum(axis=1) > 0)
        assert rows[path.relative_to(out).as_posix()].n_tiles == n


@pytest.fixture
def thread_client():
    """A real LocalCluster of two worker threads in this process, on TCP."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            protocol="tcp://",  # reachable by other processes (the concurrent-runs test)
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def test_a_corrupt_and_a_fake_slide_are_listed_and_the_others_finish(
    cohort_slides: list[Path], tmp_path: Path, thread_client
) -> None:
    good = cohort_slides[:3]
    fake = tmp_path / "notes.svs"
    fake.write_text("not a slide")
    truncated = tmp_path / "truncated.svs"
    data = cohort_slides[3].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])  # header intact, tile data cut off
    missing = tmp_path / "gone.svs"
    entries = read_cohort_inputs(
        [
            _manifest(
                tmp_path / "m.csv", good, [f"{fake},fake", f"{truncated},cut", f"{missing},gone"]
            )
        ]
    )
    out = tmp_path / "cohort"
    run = run_cohort(entries, out_dir=out, settings=SETTINGS, executor=thread_client, retries=1)
    by_id = {r.slide_id: r for r in run.reports}
    assert [by_id[f"id-{s.stem}"].status for s in good] == ["embedded"] * 3
    assert {r.slide_id for r in run.failed} == {"fake", "cut", "gone"}
    # a file that is not a slide fails the same way every time: not tried again
    assert by_id["fake"].attempts == 1 and "notes.svs" in by_id["fake"].error
    assert "does not exist" in by_id["gone"].error and by_id["gone"].attempts == 0
    assert by_id["cut"].error and "\n" not in by_id["cut"].error
    assert len(_h5_files(out)) == 3
    _assert_complete(out)
    report = {r["slide_id"]: r for r in read_report(run.report_path)}
    assert report["fake"]["status"] == "failed" and report["fake"]["error"]
    assert report["id-case0"]["status"] == "embedded" and float(report["id-case0"]["embed_s"]) > 0
    assert report["id-case0"]["worker"].startswith(("inproc://", "tcp://"))


def test_killed_worker_mid_slide_its_slide_is_redone_and_no_half_file_is_left(
    cohort_slides: list[Path], small_pyramid: Path, tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster

    big = tmp_path / "big.svs"  # ~180 tiles at 0.5 µm/px: many batches to be killed in
    shutil.copy(small_pyramid, big)
    entries = read_cohort_inputs([big, *cohort_slides[:3]])
    out = tmp_path / "cohort"
    settings = EmbedSettings(encoder="tiny-vit", mpp=0.5, batch_size=2, device="cpu", workers=1)
    folder_box: dict[str, object] = {}
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)

        def target() -> None:
            try:
                folder_box["run"] = run_cohort(
                    entries, out_dir=out, settings=settings, executor=client, retries=2
                )
            except BaseException as exc:  # surfaced below
                folder_box["error"] = exc

        runner = threading.Thread(target=target)
        runner.start()
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and runner.is_alive():
            if list(out.rglob(".big.h5.*.tmp")):  # the big slide is being written now
                for addr, keys in client.processing().items():
                    if any(str(k).startswith("gpfm-embed-0-") for k in keys):
                        killed = pids[addr]
                        os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        runner.join(timeout=180)
    assert "error" not in folder_box, folder_box.get("error")
    assert killed is not None, "the big slide was never seen half-written"
    run = folder_box["run"]
    by_id = {r.slide_id: r for r in run.reports}
    assert all(r.status == "embedded" for r in run.reports), [
        (r.slide_id, r.status, r.error) for r in run.reports
    ]
    assert by_id["big"].pid != killed  # redone by another worker process
    assert by_id["big"].n_tiles > 100
    _assert_complete(out)
    assert len(_h5_files(out)) == 4


def _run_embed_process(manifest: Path, out: Path, report: Path, scheduler: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "gpfm_core", "embed", str(manifest), "--encoder", "tiny-vit",
        "--mpp", str(MPP), "--batch-size", "4", "--device", "cpu", "--out", str(out),
        "--scheduler", scheduler, "--report", str(report), "--quiet",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_runs_on_one_cohort_embed_each_slide_once(
    cohort_slides: list[Path], tmp_path: Path, thread_client
) -> None:
    manifest = _manifest(tmp_path / "cohort.csv", cohort_slides)
    out = tmp_path / "cohort"
    address = thread_client.scheduler.address
    reports = [tmp_path / "run_a.csv", tmp_path / "run_b.csv"]
    procs = [_run_embed_process(manifest, out, r, address) for r in reports]
    for p in procs:
        _stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
    rows = [{r["slide_id"]: r for r in read_report(path)} for path in reports]
    for s in cohort_slides:
        statuses = sorted(run[f"id-{s.stem}"]["status"] for run in rows)
        # one run embedded it; the other found it done (waited on its lock, or after)
        assert statuses.count("embedded") == 1, (s.name, statuses)
        assert set(statuses) <= {"embedded", "reused", "skipped"}
    assert len(_h5_files(out)) == len(cohort_slides)
    _assert_complete(out)
    table = read_table(out)
    assert sorted(r.slide_id for r in table) == sorted(f"id-{s.stem}" for s in cohort_slides)
    # the CLIs' "quiet about empty slides" ran on worker threads of *this* process: it must
    # not have silenced this process's tissue log or warnings for good
    assert logging.getLogger("gpfm_core.tissue").filters == []
    assert not any(f[0] == "ignore" and f[2] is NoTissueWarning for f in warnings.filters)


def _index_state(index_dir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file of an index: a rewrite changes one of them."""
    return {
        p.relative_to(index_dir).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(index_dir.rglob("*"))
        if p.is_file()
    }


def _kill_the_writer_of(proc: subprocess.Popen, pattern: str, out: Path, timeout: float) -> int:
    """SIGKILL the worker process (a child of ``proc``) holding a temporary ``pattern`` file
    open, i.e. the worker writing that slide right now; returns its pid."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        temps = {str(p) for p in out.rglob(pattern)}
        if temps:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    held = {f.path for f in child.open_files()}
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if held & temps:
                    os.kill(child.pid, signal.SIGKILL)
                    return child.pid
        time.sleep(0.02)
    raise AssertionError(f"no worker was seen writing {pattern}")


def test_gpfm_embed_cluster_survives_a_killed_worker_writes_report_and_index_rerun_does_nothing(
    cohort_slides: list[Path],
    small_pyramid: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 11's done criterion, through the CLI: ``gpfm embed --cluster local:2 cohort.csv
    --out cohort/`` embeds a generated cohort, survives a worker killed mid-slide, writes its
    report and its index, and a rerun does nothing."""
    from gpfm_core.cohort import CohortIndex, find_index, index_dir_for
    from gpfm_core.embed import load_embeddings

    big = tmp_path / "big.svs"  # ~180 tiles at 0.5 µm/px, 2 a batch: many batches to be killed in
    shutil.copy(small_pyramid, big)
    manifest = _manifest(tmp_path / "cohort.csv", [big, *cohort_slides[:3]])
    out = tmp_path / "cohort"
    args = ["embed", "--cluster", "local:2", str(manifest), "--encoder", "tiny-vit", "--mpp",
            "0.5", "--batch-size", "2", "--workers", "1", "--device", "cpu", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpfm_core", *args],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        killed = _kill_the_writer_of(proc, ".big.h5.*.tmp", out, timeout=240)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "dask dashboard: http" in stderr
    assert "4 embedded" in stdout and "via local:2" in stdout, stdout
    # the report: every slide embedded, the big one redone by another process
    (report,) = (out / "reports").glob("*.csv")
    rows = {r["slide_id"]: r for r in read_report(report)}
    assert {r["status"] for r in rows.values()} == {"embedded"}
    assert int(rows["id-big"]["pid"]) != killed and int(rows["id-big"]["n_tiles"]) > 100
    _assert_complete(out)
    files = _h5_files(out)
    assert len(files) == 4
    # the index: one per feature folder, holding every slide, the features of the files
    index_dir = index_dir_for(files[0])
    assert find_index(out) == index_dir and all(index_dir_for(f) == index_dir for f in files)
    assert f"index: {index_dir} (4 added; 4 slides" in stdout
    idx = CohortIndex.open(index_dir)
    table = {r.file: r for r in read_table(out)}
    assert sorted(s.file for s in idx.slides) == files
    assert idx.n_tiles == sum(r.n_tiles for r in table.values())
    for f in files:
        emb = load_embeddings(f)
        rec = idx.slide(f)
        assert rec.slide_id == emb.attrs["slide_id"] and rec.n_tiles == len(emb)
        for row in (0, len(emb) - 1):  # float16 copy of the file's own features
            np.testing.assert_allclose(
                idx.tile_features(f, row), emb.features[row], atol=2e-2, rtol=2e-3
            )
    hits = idx.search_tile(files[0], 0, k=5, other_slides_only=True)
    assert len(hits) == 5 and all(h.file != files[0] for h in hits)

    # a rerun: nothing to do, no cluster started, no feature file or index file rewritten
    stamps = [f.stat().st_mtime_ns for f in files]
    before = _index_state(index_dir)
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "4 skipped" in captured.out and "dashboard" not in captured.err
    assert f"index: {index_dir} (unchanged; 4 slides" in captured.out
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert _index_state(index_dir) == before
    with open(out / "cohort.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_cluster_spec_errors_are_one_line(
    cohort_slides: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for spec in ("local:0", "remote", "local:x"):
        rc = main(["embed", str(cohort_slides[0]), "--cluster", spec, "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and err.startswith("gpfm embed: error:") and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("order", ["big_first", "small_first"])
def test_same_stem_file_names_follow_the_input_order(
    cohort_slides: list[Path], tmp_path: Path, thread_client, order: str
) -> None:
    """The first listed of two ``S01`` slides takes ``S01.h5`` even when the other finishes
    first: names are decided from the inputs, not by which worker is done first."""
    from gpfm_core.slide import open_slide

    big, small = cohort_slides[3], cohort_slides[2]  # 2048x1024 and 768x768 px
    sites = []
    pair = (big, small) if order == "big_first" else (small, big)
    for site, src in zip("AB", pair, strict=True):
        dst = tmp_path / f"site{site}" / "S01.svs"
        dst.parent.mkdir()
        shutil.copyfile(src, dst)
        sites.append(dst)
    entries = read_cohort_inputs(sites)
    with open_slide(sites[0]) as a, open_slide(sites[1]) as b:
        id_a, id_b = a.info.slide_id, b.info.slide_id
    assert [(e.slide_id, e.unique_name) for e in entries] == [
        ("S01", False),
        (f"S01-{id_b[:8]}", True),
    ]
    out = tmp_path / "out"
    run = run_cohort(entries, out_dir=out, settings=SETTINGS, executor=thread_client)
    assert [r.status for r in run.reports] == ["embedded", "embedded"]
    assert [Path(r.file).name for r in run.reports] == ["S01.h5", f"S01-{id_b[:8]}.h5"]
    assert sorted((r.slide_id, Path(r.file).name) for r in read_table(out)) == [
        ("S01", "S01.h5"),
        (f"S01-{id_b[:8]}", f"S01-{id_b[:8]}.h5"),
    ]
    with h5py.File(out.joinpath(run.reports[0].file), "r") as f:
        assert f.attrs["slide_id"] == id_a
