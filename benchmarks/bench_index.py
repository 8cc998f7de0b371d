"""Cohort similarity index at a million tiles: query latency, recall, adding a slide, memory.

Run (full size, ~4 GB of temporary files, 20-40 min on the 2-core machine):
    PYTHONPATH=src .venv/bin/python benchmarks/bench_index.py
Small (a few minutes):
    PYTHONPATH=src .venv/bin/python benchmarks/bench_index.py --small
Options: --tiles (1000000), --slide-tiles (20000, tiles per generated slide), --dim (1024),
--queries (200), --candidates / --nprobe (the index's defaults), --workdir (default: a
temporary folder, deleted at the end), --compare-usearch N (also build usearch's HNSW on N
tiles and print the FAISS-vs-usearch comparison behind the choice of FAISS; needs
``pip install usearch``).

What it does:
1. Writes ``tiles / slide-tiles`` feature files (float16, gpfm's layout) drawn from
   :func:`gpfm_core.cohort.synth.clustered_features`: 200 tissue-type clusters, 32-d
   variation within each, a common offset (so centring matters), per-entry noise.
2. ``build_index`` over them (quantisers trained on a sample, every tile encoded).
3. In a fresh child process: RSS before and after ``CohortIndex.open`` and after the queries
   (``VmRSS`` = ``RssAnon`` + ``RssFile``: the memory-mapped float16 rows the re-rank read
   count in ``RssFile``); ``--queries`` held-out tiles (new draws, not in the index) ->
   top-10 after re-rank: p50 / p95 latency, split into candidate stage and re-rank; recall@10
   against an exhaustive centred cosine over every tile of the files (float64).
4. ``add_to_index`` of one new slide of ``--slide-tiles`` tiles (read, float16 copy, encode,
   commit) and ``remove_from_index`` of it.
5. The projection to 20 million tiles (1,000 slides of 20,000), with its arithmetic.

Targets (issue 11): p95 <= 30 ms, recall@10 >= 0.95, add one 20,000-tile slide <= 15 s,
RSS of the loaded index <= 1.5 GB. Figures on a shared machine are slower than on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gpfm_core.analysis.similarity import center_features  # noqa: E402
from gpfm_core.cohort import (  # noqa: E402
    CohortIndex,
    add_to_index,
    build_index,
    default_candidates,
    default_nprobe,
    remove_from_index,
)
from gpfm_core.cohort.synth import clustered_features, write_feature_file  # noqa: E402

TARGETS = {"p95_ms": 30.0, "recall": 0.95, "add_s": 15.0, "rss_gb": 1.5}
QUERY_SEED = 10**6  # held-out draws: no slide uses this seed


def _rss() -> dict[str, float]:
    """Resident memory of this process in MB (Linux ``/proc/self/status``)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(val.split()[0]) / 1024
    return out


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _generate(folder: Path, n: int, per_slide: int, dim: int) -> tuple[list[Path], np.ndarray]:
    """Write the cohort; returns the files and the exact float64 mean of what they hold."""
    folder.mkdir(parents=True, exist_ok=True)
    files, total, count = [], np.zeros(dim), 0
    for i in range(int(np.ceil(n / per_slide))):
        m = min(per_slide, n - i * per_slide)
        x = clustered_features(m, dim, seed=i).astype(np.float16)  # as stored: the originals
        files.append(
            write_feature_file(folder / f"s{i:05d}.h5", x, slide_id=f"s{i:05d}", dtype="float16")
        )
        total += x.sum(axis=0, dtype=np.float64)
        count += m
    return files, total / count


def _ground_truth(files: list[Path], mean: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) global row numbers of the exact top-k centred cosines, streaming the files."""
    from gpfm_core.embed import load_embeddings

    qn = center_features(queries, mean=mean, unit=True)[0].astype(np.float64)
    best_s = np.full((len(queries), k), -np.inf)
    best_i = np.zeros((len(queries), k), np.int64)
    offset = 0
    for f in files:
        x = load_embeddings(f).features.astype(np.float64) - mean
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        s = qn @ x.T  # (Q, n)
        cat_s = np.concatenate([best_s, s], axis=1)
        cat_i = np.concatenate(
            [best_i, offset + np.arange(x.shape[0])[None].repeat(len(queries), 0)], axis=1
        )
        top = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cat_s, top, 1)
        best_i = np.take_along_axis(cat_i, top, 1)
        offset += x.shape[0]
    return best_i


def child(
    index_dir: Path, queries_npy: Path, k: int, candidates: int | None, nprobe: int | None
) -> dict[str, Any]:
    """Measure RSS and query latency of a freshly loaded index (run in its own process)."""
    import faiss  # noqa: F401  (its import is not the index's memory)

    queries = np.load(queries_npy)
    rss0 = _rss()
    t0 = time.perf_counter()
    idx = CohortIndex.open(index_dir)
    open_s = time.perf_counter() - t0
    rss1 = _rss()
    n_cand = candidates or default_candidates(k)
    lat, cand_t, rerank_t, hits = [], [], [], []
    offsets = np.cumsum([0] + [s.n_tiles for s in idx.slides])
    start = {s.slide_id: int(o) for s, o in zip(idx.slides, offsets, strict=False)}
    idx.search(queries[0], k, candidates=n_cand, nprobe=nprobe)  # warm-up (first faiss call)
    for q in queries:
        t = time.perf_counter()
        res = idx.search(q, k, candidates=n_cand, nprobe=nprobe)
        lat.append(time.perf_counter() - t)
        hits.append([start[h.slide_id] + h.row for h in res])
        t = time.perf_counter()
        c = idx.candidates(q, n_cand, nprobe=nprobe)
        cand_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        idx.rerank(q, c, k)
        rerank_t.append(time.perf_counter() - t)
    rss2 = _rss()
    return {
        "open_s": open_s,
        "rss_before": rss0,
        "rss_open": rss1,
        "rss_after": rss2,
        "lat_ms": [x * 1e3 for x in lat],
        "cand_ms": [x * 1e3 for x in cand_t],
        "rerank_ms": [x * 1e3 for x in rerank_t],
        "hits": hits,
        "params": {**idx.params, "nprobe": nprobe or idx.params.get("nprobe")},
        "n_tiles": idx.n_tiles,
        "candidates": n_cand,
    }


def compare_usearch(n: int, dim: int, queries: int = 100) -> None:
    """FAISS IVF-PQ vs usearch HNSW (int8) on the same n tiles: the measurement behind FAISS."""
    import faiss

    try:
        from usearch.index import Index
    except ImportError:
        print("usearch is not installed (pip install usearch): comparison skipped")
        return
    faiss.omp_set_num_threads(1)
    x = clustered_features(n, dim, seed=0)
    q = clustered_features(queries, dim, seed=QUERY_SEED)
    mean = x.mean(axis=0)
    xu = center_features(x, mean=mean, unit=True)[0]
    qu = center_features(q, mean=mean, unit=True)[0]
    gt = np.argsort(-(qu @ xu.T), axis=1)[:, :10]
    x16 = xu.astype(np.float16)

    def evaluate(search: Any) -> tuple[float, float]:
        lat, rec = [], []
        for i in range(queries):
            t = time.perf_counter()
            c = search(qu[i])
            c = c[c >= 0]
            top = c[np.argsort(-(x16[c].astype(np.float32) @ qu[i]))[:10]]
            lat.append(time.perf_counter() - t)
            rec.append(len(set(top.tolist()) & set(gt[i].tolist())) / 10)
        return float(np.mean(rec)), float(np.median(lat) * 1e3)

    nlist = 2 ** round(np.log2(n) / 2)
    t, c = time.perf_counter(), time.process_time()
    fi = faiss.index_factory(dim, f"IVF{nlist},PQ{dim // 16}")
    fi.do_polysemous_training = False
    fi.train(xu[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)])
    fi.add(xu)
    f_wall, f_cpu = time.perf_counter() - t, time.process_time() - c
    fi.nprobe = default_nprobe(nlist)
    f_rec, f_lat = evaluate(lambda v: fi.search(v[None], 256)[1][0])
    t, c = time.perf_counter(), time.process_time()
    ui = Index(ndim=dim, metric="cos", dtype="i8", connectivity=16)
    ui.add(np.arange(n), xu, threads=1)
    u_wall, u_cpu = time.perf_counter() - t, time.process_time() - c
    u_rec, u_lat = evaluate(lambda v: ui.search(v, 256).keys.astype(np.int64))
    f_mem = n * (dim // 16 + 8) / 1e6
    print(f"\nFAISS vs usearch on {n} x {dim}-d (1 thread each, re-rank of 256, load {_load()})")
    print("| library | build wall (CPU) | recall@10 | median query | index memory |")
    print("|---|---|---|---|---|")
    print(
        f"| FAISS IVF{nlist},PQ{dim // 16} | {f_wall:.1f} s ({f_cpu:.1f} s) | {f_rec:.3f} | {f_lat:.1f} ms | {f_mem:.0f} MB (codes + ids) |"
    )
    print(
        f"| usearch HNSW i8 M=16 | {u_wall:.1f} s ({u_cpu:.1f} s) | {u_rec:.3f} | {u_lat:.1f} ms | {ui.memory_usage / 1e6:.0f} MB |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=1_000_000)
    ap.add_argument("--slide-tiles", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=None)
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--small", action="store_true", help="60,000 tiles, 5,000 per slide, 50 queries"
    )
    ap.add_argument("--compare-usearch", type=int, default=0, metavar="N")
    ap.add_argument("--child", nargs=2, type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(*args.child, 10, args.candidates, args.nprobe)))
        return 0
    if args.small:
        args.tiles, args.slide_tiles, args.queries = 60_000, 5_000, 50
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_index_"))
    try:
        return _run(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    k = 10
    print(
        f"# cohort index benchmark: {args.tiles} tiles x {args.dim}-d, {args.slide_tiles} per slide"
    )
    print(f"load average at start: {_load()} ({os.cpu_count()} cores)")
    files = sorted((work / "cohort").glob("s*.h5"))
    n_files = int(np.ceil(args.tiles / args.slide_tiles))
    if len(files) == n_files and (work / "index" / "index.json").is_file():
        # --workdir of an earlier run: same cohort, same index (delete the folder to redo)
        mean = np.load(work / "mean.npy")
        print(f"reusing the cohort and index in {work}")
        build_s = build_cpu = float("nan")
    else:
        t = time.perf_counter()
        files, mean = _generate(work / "cohort", args.tiles, args.slide_tiles, args.dim)
        np.save(work / "mean.npy", mean)
        print(f"generated {len(files)} feature files in {time.perf_counter() - t:.0f} s")
        t, c = time.perf_counter(), time.process_time()
        res = build_index(files, work / "index")
        build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
        print(f"build_index: {build_s:.0f} s ({build_cpu:.0f} CPU-s), trained={res.trained}")

    queries = clustered_features(args.queries, args.dim, seed=QUERY_SEED)
    np.save(work / "queries.npy", queries)
    gt_file = work / f"gt_{args.queries}.npy"
    if gt_file.is_file():
        gt = np.load(gt_file)
    else:
        t = time.perf_counter()
        gt = _ground_truth(files, mean, queries, k)
        np.save(gt_file, gt)
        print(
            f"exhaustive ground truth for {args.queries} queries: {time.perf_counter() - t:.0f} s"
        )
    cmd = [sys.executable, __file__, "--child", str(work / "index"), str(work / "queries.npy")]
    if args.candidates:
        cmd += ["--candidates", str(args.candidates)]
    if args.nprobe:
        cmd += ["--nprobe", str(args.nprobe)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    recall = float(
        np.mean([len(set(h) & set(g.tolist())) / k for h, g in zip(r["hits"], gt, strict=True)])
    )
    p50, p95 = np.percentile(r["lat_ms"], [50, 95])
    c50, c95 = np.percentile(r["cand_ms"], [50, 95])
    r50, r95 = np.percentile(r["rerank_ms"], [50, 95])
    rss_open = r["rss_open"]["VmRSS"] - r["rss_before"]["VmRSS"]
    rss_after = r["rss_after"]["VmRSS"] - r["rss_before"]["VmRSS"]

    # add one slide, then remove it
    new = write_feature_file(
        work / "new" / "new.h5",
        clustered_features(args.slide_tiles, args.dim, seed=10**6 + 1).astype(np.float16),
        slide_id="new",
        dtype="float16",
    )
    t, c = time.perf_counter(), time.process_time()
    add = add_to_index(work / "index", new)
    add_s, add_cpu = time.perf_counter() - t, time.process_time() - c
    t = time.perf_counter()
    remove_from_index(work / "index", ["new"])
    remove_s = time.perf_counter() - t
    assert add.added == ["new"]

    p = r["params"]
    ok = lambda good: "yes" if good else "**no**"  # noqa: E731
    print(
        f"\nindex: {r['n_tiles']} tiles, IVF{p.get('nlist')},PQ{p.get('pq_m')}, nprobe {p.get('nprobe')}, "
        f"{r['candidates']} candidates re-ranked; load average now {_load()}"
    )
    print("| measure | value | target | met |")
    print("|---|---|---|---|")
    print(
        f"| query -> top-10 after re-rank, p50 / p95 | {p50:.1f} / {p95:.1f} ms | p95 <= 30 ms | {ok(p95 <= TARGETS['p95_ms'])} |"
    )
    print(f"|   candidate stage p50 / p95 | {c50:.1f} / {c95:.1f} ms | | |")
    print(f"|   exact re-rank p50 / p95 | {r50:.1f} / {r95:.1f} ms | | |")
    print(
        f"| recall@10 vs exhaustive centred cosine | {recall:.3f} | >= 0.95 | {ok(recall >= TARGETS['recall'])} |"
    )
    print(
        f"| add one slide of {args.slide_tiles} tiles (CPU time) | {add_s:.1f} s ({add_cpu:.1f} CPU-s) | <= 15 s | {ok(add_s <= TARGETS['add_s'])} |"
    )
    print(f"| remove it | {remove_s:.2f} s | | |")
    print(f"| open the index | {r['open_s']:.1f} s | | |")
    print(
        f"| RSS of the loaded index (after open / after queries) | {rss_open:.0f} / {rss_after:.0f} MB "
        f"(RssAnon {r['rss_after']['RssAnon'] - r['rss_before']['RssAnon']:.0f}, RssFile {r['rss_after']['RssFile'] - r['rss_before']['RssFile']:.0f}) "
        f"| <= 1.5 GB | {ok(rss_after / 1024 <= TARGETS['rss_gb'])} |"
    )
    print(
        f"| process RSS (python + numpy + faiss + index) | {r['rss_after']['VmRSS']:.0f} MB | | |"
    )
    print(f"| build_index ({len(files)} slides) | {build_s:.0f} s ({build_cpu:.0f} CPU-s) | | |")
    _projection(args, r, add_s, build_s)
    if args.compare_usearch:
        compare_usearch(args.compare_usearch, args.dim)
    return 0


def _projection(args: argparse.Namespace, r: dict[str, Any], add_s: float, build_s: float) -> None:
    """Print the figures projected to 20 million tiles, with the arithmetic."""
    n, big, d = r["n_tiles"], 20_000_000, args.dim
    p = r["params"]
    m = p.get("pq_m", d // 16)
    nlist, nprobe = p.get("nlist", 1024), p.get("nprobe", 64)
    nlist20 = 4096  # what build_index picks at 20 M: the power of two nearest sqrt(20e6)=4472
    nprobe20 = default_nprobe(nlist20)  # the default: the same fraction of the lists
    scanned, scanned20 = nprobe * n / nlist, nprobe20 * big / nlist20
    f = scanned20 / scanned
    c50, r50 = np.percentile(r["cand_ms"], 50), np.percentile(r["rerank_ms"], 50)
    print(f"\n## Projection to {big:,} tiles (1,000 slides of 20,000), {d}-d")
    print(
        f"- RAM of the loaded index: codes + ids = ({m} + 8) B x {big:,} = {(m + 8) * big / 1e9:.2f} GB "
        f"+ coarse centroids {nlist20} x {d} x 4 B = {nlist20 * d * 4 / 1e6:.0f} MB (here: "
        f"{(m + 8) * n / 1e6:.0f} MB for {n:,} tiles): at the 1.5 GB target; pq_m={d // 32} "
        "(32 B/tile) would halve it at some recall cost."
    )
    print(
        f"- Disk: float16 copy {d * 2} B x {big:,} = {d * 2 * big / 1e9:.0f} GB, coords 16 B -> "
        f"{16 * big / 1e9:.2f} GB, codes {m + 2} B -> {(m + 2) * big / 1e9:.2f} GB, in per-slide files."
    )
    print(
        f"- Query: the candidate stage scans nprobe x N / nlist codes: {nprobe} x {n:,} / {nlist} = "
        f"{scanned:,.0f} here, {nprobe20} x {big:,} / {nlist20} = {scanned20:,.0f} at 20 M (x{f:.1f}); "
        f"the re-rank reads {r['candidates']} rows whatever N. Median: {c50:.2f} ms x {f:.1f} + "
        f"{r50:.2f} ms = {c50 * f + r50:.1f} ms (float16 rows in the page cache; when the "
        f"{d * 2 * big / 1e9:.0f} GB do not fit, a cold re-rank adds {r['candidates']} random "
        f"reads, ~{r['candidates'] * 0.1:.0f} ms on an SSD at 0.1 ms each). Past ~30 ms the "
        "remedy is fewer probes (recall to re-measure) or FAISS's 4-bit fast-scan PQ."
    )
    print(
        f"- Add one slide: reading, the float16 copy and the PQ codes do not depend on N; the "
        f"coarse assignment grows with nlist ({nlist} -> {nlist20}), so at most {add_s:.1f} s x "
        f"{nlist20 / nlist:.0f} = {add_s * nlist20 / nlist:.0f} s (upper bound: only that part scales)."
    )
    print(
        f"- Full rebuild (retraining), a one-off: {build_s:.0f} s for {n:,} tiles scales with N to "
        f"{build_s * big / n / 3600:.1f} h, more for the finer coarse assignment; adds avoid it."
    )


if __name__ == "__main__":
    sys.exit(main())
