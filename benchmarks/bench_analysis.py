"""Speed of gpfm_core.analysis on 100,000 synthetic tiles x 1024-d (mixture of gaussians).

Run:  NUMBA_CACHE_DIR=.cache/numba PYTHONPATH=src .venv/bin/python benchmarks/bench_analysis.py
Options: --n (tiles, default 100000), --dim (1024), --umap-n (100000; 0 skips UMAP),
--umap-seeds (comma list, "none" = parallel/unseeded; default "0,none"), --umap-epochs
(comma list, "default" = default_umap_epochs: 100 at 100,000 tiles; default "default,200"),
--repeats (20), --skip-numba.
Prints a markdown table: median (min) of the repeats, target; and the 1-min load average at
the start and the end (the benchmark machine is shared: figures under load are slower).

The probe runs on its own harder mixture: 4 unequal classes whose centres overlap
(per-dimension centre scale 0.08 against unit noise), so CV balanced accuracy is realistic
(~0.85-0.9) and L-BFGS needs a realistic number of iterations.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gpfm_core.analysis import (  # noqa: E402
    LinearProbe,
    SimilarityIndex,
    kmeans_clusters,
    pca_reduce,
    tiles_to_raster,
    top_k,
    umap_embed,
)
from gpfm_core.analysis.knn import exact_knn, ivf_knn  # noqa: E402

Row = tuple[str, str, str, str]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _fmt(median: float, best: float) -> str:
    if median < 1:
        return f"{median * 1e3:.1f} ms ({best * 1e3:.1f})"
    return f"{median:.2f} s ({best:.2f})"


def _probe_mixture(n: int, d: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """4 overlapping classes, 40/30/20/10 %, offset features (standardisation matters)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.08, size=(4, d)).astype(np.float32)
    y = rng.choice(4, n, p=[0.4, 0.3, 0.2, 0.1])
    x = rng.standard_normal((n, d), dtype=np.float32)
    x += centres[y]
    x += 2.0
    return x, y


def _mixture(n: int, d: int, k: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.6, size=(k, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x += centres[y]
    return x, y


_COLD = """
import time, numpy as np
t0 = time.perf_counter()
from gpfm_core.analysis import umap_embed
x = np.random.default_rng(0).normal(size=(500, 32)).astype(np.float32)
umap_embed(x, n_neighbors=10, pca_dim=None, seed=0)
print(time.perf_counter() - t0)
"""


_FRESH_UMAP = """
import sys, time
sys.path.insert(0, {bench!r})
from bench_analysis import _mixture
x, _ = _mixture({n}, {d})
t0 = time.perf_counter()
from gpfm_core.analysis import umap_embed
umap_embed(x, seed=0)
print(time.perf_counter() - t0)
"""


def _numba_start(cache_dir: str) -> float:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", _COLD], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


class _Rows(list):
    """Rows of the table, echoed to stderr as they complete (partial runs stay useful)."""

    def append(self, row: Row) -> None:
        super().append(row)
        print("done: " + " | ".join(row), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--umap-n", type=int, default=100_000)
    ap.add_argument("--umap-seeds", default="0,none")
    ap.add_argument("--umap-epochs", default="default,200")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-numba", action="store_true")
    args = ap.parse_args(argv)
    n, d, reps = args.n, args.dim, args.repeats
    load_start = os.getloadavg()[0]
    x, _y = _mixture(n, d)
    rows = _Rows()

    index = SimilarityIndex(x)
    q = x[123]
    rows.append(
        (
            f"cosine, {n:,} x {d} (float32, default)",
            _fmt(*_time(lambda: index.query(q), reps)),
            "< 30 ms",
            f"median of {reps}",
        )
    )
    exact = index.query(q)
    for precision in ("bfloat16", "float16"):
        half = SimilarityIndex(x, precision=precision)
        half.query(q)  # torch import / first call
        err = float(np.abs(half.query(q) - exact).max())
        overlap = len(
            set(top_k(exact, 100)[0].tolist()) & set(top_k(half.query(q), 100)[0].tolist())
        )
        rows.append(
            (
                f"cosine, {n:,} x {d} ({precision}, torch)",
                _fmt(*_time(lambda h=half: h.query(q), reps)),
                "",
                f"max abs err {err:.1e}, top-100 overlap {overlap}/100, median of {reps}",
            )
        )
        del half
    normed = index.normalized
    rows.append(
        (
            f"reference: bare numpy matvec, {n:,} x {d}",
            _fmt(*_time(lambda: normed @ q, reps)),
            "",
            "memory-bandwidth floor for cosine",
        )
    )
    scores = index.query(q)
    rows.append(
        (
            f"top_k(k=100) of {n:,}",
            _fmt(*_time(lambda: top_k(scores, 100, exclude=[123]), reps)),
            "",
            f"median of {reps}",
        )
    )
    rows.append(
        (
            f"SimilarityIndex build, {n:,} x {d}",
            _fmt(*_time(lambda: SimilarityIndex(x), 3)),
            "",
            "once per slide, median of 3",
        )
    )
    cindex = SimilarityIndex(x, center=True)
    rows.append(
        (
            f"centred cosine (the dock's), {n:,} x {d}",
            _fmt(*_time(lambda c=cindex: c.query(c.direction(123), centred=True), reps)),
            "< 30 ms",
            f"one tile's query; O(N*D) like raw cosine, median of {reps}",
        )
    )
    rows.append(
        (
            f"SimilarityIndex build, centred, {n:,} x {d}",
            _fmt(*_time(lambda: SimilarityIndex(x, center=True), 3)),
            "",
            "once per slide (mean, centre, normalise), median of 3",
        )
    )
    del cindex

    # 10,000 labelled tiles and the rest held out; a small --n keeps a tenth held out
    n_fit = min(10_000, n - max(n // 10, 1))
    xp, yp = _probe_mixture(n, d)
    labels = np.where(np.arange(n) < n_fit, yp, -1)  # 4 classes, rest unlabelled
    names = ["a", "b", "c", "d"]
    held = slice(n_fit, n)
    LinearProbe().fit(xp[:500], labels[:500], class_names=names, cv_folds=0)  # imports
    probe = LinearProbe()
    med, best = _time(lambda: probe.fit(xp, labels, class_names=names, cv_folds=0), 3)
    held_labels, _ = probe.predict(xp[held])
    ref = LinearProbe(solver="sklearn")
    ref_med, ref_best = _time(lambda: ref.fit(xp, labels, class_names=names, cv_folds=0), 1)
    agree = float(np.mean(ref.predict(xp[held])[0] == held_labels))
    rows.append(
        (
            f"probe fit, {n_fit:,} labelled x {d} (torch L-BFGS, default)",
            _fmt(med, best),
            "< 2 s",
            f"no CV, median of 3; {agree:.1%} same labels as sklearn on {n - n_fit:,} held out",
        )
    )
    rows.append(
        (
            f"reference: sklearn lbfgs fit, {n_fit:,} x {d}",
            _fmt(ref_med, ref_best),
            "",
            "solver='sklearn', once",
        )
    )
    med, best = _time(lambda: probe.fit(xp, labels, class_names=names, cv_folds=5), 3)
    rep = probe.fit(xp, labels, class_names=names, cv_folds=5)
    rows.append(
        (
            f"probe fit + 5-fold CV, {n_fit:,}",
            _fmt(med, best),
            "",
            f"CV bal. acc {rep.cv_balanced_accuracy:.3f}, median of 3",
        )
    )
    groups = np.arange(n) // 50  # "annotations" of 50 consecutive tiles (classes mixed)
    med, best = _time(
        lambda: probe.fit(xp, labels, class_names=names, groups=groups, cv_folds=5), 3
    )
    rep = probe.fit(xp, labels, class_names=names, groups=groups, cv_folds=5)
    rows.append(
        (
            f"probe fit + 5-fold CV grouped by annotation, {n_fit:,}",
            _fmt(med, best),
            "",
            f"{rep.cv_groups} groups (StratifiedGroupKFold, scaler per fold), median of 3",
        )
    )
    rows.append(
        (
            f"probe predict, {n:,} x {d}",
            _fmt(*_time(lambda: probe.predict(xp), 5)),
            "< 0.5 s",
            "median of 5",
        )
    )

    side = int(np.ceil(np.sqrt(n)))
    grid_rc = np.stack([np.arange(n) // side, np.arange(n) % side], axis=1)
    vals = scores.astype(np.float32)
    rows.append(
        (
            f"tiles_to_raster, {n:,}",
            _fmt(*_time(lambda: tiles_to_raster(vals, grid_rc, (side, side)), reps)),
            "",
            f"median of {reps}",
        )
    )

    t0 = time.perf_counter()
    pcs = pca_reduce(x, n_components=50)
    rows.append(
        (
            f"PCA-50 of {n:,} x {d}",
            _fmt(time.perf_counter() - t0, time.perf_counter() - t0),
            "",
            "once",
        )
    )
    rows.append(
        (
            f"k-means k=8 on PCA-50, {n:,}",
            _fmt(*_time(lambda: kmeans_clusters(pcs, 8), 3)),
            "",
            "MiniBatchKMeans, median of 3",
        )
    )

    if args.umap_n > 0:
        un = min(args.umap_n, n)
        umap_embed(x[:500], n_neighbors=10, seed=0)  # imports + numba compile / cache load
        umap_embed(x[:500], n_neighbors=10, seed=None)
        if un > 30_000:  # the inverted-file neighbour search, against exact, side by side
            pcs_u = pcs[:un]
            t0 = time.perf_counter()
            ex_i, ex_d = exact_knn(pcs_u, 15)
            t_exact = time.perf_counter() - t0
            t0 = time.perf_counter()
            iv_i, iv_d = ivf_knn(pcs_u, 15)
            t_ivf = time.perf_counter() - t0
            recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(ex_i, iv_i, strict=True)])
            ratio = float(iv_d[:, 1:].mean() / ex_d[:, 1:].mean())
            rows.append((f"exact_knn k=15, {un:,} x 50", _fmt(t_exact, t_exact), "", "once"))
            rows.append(
                (
                    f"ivf_knn k=15, {un:,} x 50 (used by UMAP above 30,000)",
                    _fmt(t_ivf, t_ivf),
                    "",
                    f"once; recall@15 {recall:.3f}, mean distance x{ratio:.4f} of exact",
                )
            )
            del ex_i, ex_d, iv_i, iv_d
            t0 = time.perf_counter()
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _FRESH_UMAP.format(bench=str(ROOT / "benchmarks"), n=un, d=d),
                ],
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                capture_output=True,
                text=True,
                check=True,
            )
            inner = float(out.stdout.strip().splitlines()[-1])
            rows.append(
                (
                    f"UMAP of {un:,} x {d}, first call in a fresh process (seed=0)",
                    _fmt(inner, inner),
                    "< 90 s",
                    f"import + PCA + graph + layout; numba cache as in NUMBA_CACHE_DIR; "
                    f"process {time.perf_counter() - t0:.0f} s with data generation",
                )
            )
        for seed_s in args.umap_seeds.split(","):
            for ep_s in args.umap_epochs.split(","):
                seed = None if seed_s.strip() == "none" else int(seed_s)
                n_epochs = None if ep_s.strip() == "default" else int(ep_s)
                stages: dict[str, float] = {}
                t0 = time.perf_counter()

                def _stage(stage: str, _f: float, t0: float = t0, st: dict = stages) -> None:
                    st.setdefault(stage, time.perf_counter() - t0)

                umap_embed(x[:un], seed=seed, n_epochs=n_epochs, progress=_stage)
                dt = time.perf_counter() - t0
                split = ", ".join(f"{k} from {v:.0f} s" for k, v in stages.items())
                mode = "single-threaded, reproducible" if seed is not None else "all cores"
                rows.append(
                    (
                        f"UMAP of {un:,} x {d} (PCA-50, seed={seed}, n_epochs={ep_s.strip()})",
                        _fmt(dt, dt),
                        "< 90 s",
                        f"once, {mode}; {split}",
                    )
                )

    if not args.skip_numba:
        cache = tempfile.mkdtemp(prefix="gpfm-numba-")
        try:
            cold = _numba_start(cache)
            warm = [_numba_start(cache) for _ in range(2)]
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        rows.append(
            (
                "fresh process: import + UMAP(500), empty numba cache",
                _fmt(cold, cold),
                "",
                "first process",
            )
        )
        rows.append(
            (
                "fresh process: import + UMAP(500), cached",
                _fmt(statistics.median(warm), min(warm)),
                "",
                "2 later processes",
            )
        )

    print(
        f"\nMachine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {_cpu_model()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"1-min load average at the start {load_start:.1f} and at the end "
        f"{os.getloadavg()[0]:.1f} (shared machine: other jobs compete for the cores)"
    )
    print(f"Command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    print("| operation | median (best) | target | notes |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
