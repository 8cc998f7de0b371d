"""Speed of gpfm_core.evaluation: tile protocols, ABMIL training, applying a slide model.

Run:  PYTHONPATH=src .venv/bin/python benchmarks/bench_eval.py            (issue 13 sizes)
      PYTHONPATH=src .venv/bin/python benchmarks/bench_eval.py --small    (a quick check)

Three measurements, each against its target (issue 13):

1. **Tile task**: ``--items`` (10,000) labelled tiles x ``--dim`` (1024) x ``--encoders`` (3)
   feature sets, 9 overlapping classes (CRC-100K-like), split 70/10/20; every protocol
   (linear probe, kNN k=1/20, few-shot 1-16 shots x 5 repeats, retrieval) with 1000-resample
   bootstrap CIs. Target: all of it within 120 s.
2. **ABMIL training**: ``--slides`` (200) slides x ``--tiles`` (5,000) tiles x ``--dim``
   per epoch (one slide per step, Adam). Reported as slides/s against this CPU's bound:
   forward + backward FLOPs of one slide divided by the float32 matmul GFLOP/s measured here
   at the same shape. Target: >= 0.5 x bound. The slides cycle over 8 distinct feature
   arrays (200 x 5,000 x 1024 float32 would be 4 GB); the arithmetic is the same.
3. **Applying a slide model** (``apply_slide_model``) to ``--apply-tiles`` (100,000) tiles x
   ``--dim``: fp32 and bf16. Target: <= 200 ms. Also printed: the time the first layer's
   matmul alone needs at the measured GFLOP/s (the floor for that precision).

Prints a markdown table and the 1-min load average before and after (the benchmark
machine is shared: figures under load are slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_analysis import _cpu_model  # noqa: E402
from gpfm_core.evaluation import MILConfig, SlideBags, run_tile_protocols, train_abmil  # noqa: E402
from gpfm_core.evaluation.mil import (  # noqa: E402
    SlideModel,
    apply_slide_model,
    build_abmil,
)


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n: int, d: int, h: int, *, dtype: str = "fp32", repeats: int = 7) -> float:
    """Measured GFLOP/s of ``(n, d) @ (d, h)`` in torch (the ABMIL first layer's shape)."""
    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, d).to(dt)
    w = torch.randn(h, d).to(dt)
    with torch.inference_mode():
        torch.nn.functional.linear(a, w)  # warm-up
        sec = _median_time(lambda: torch.nn.functional.linear(a, w), repeats)
    return 2.0 * n * d * h / sec / 1e9


def abmil_flops(n: int, d: int, *, hidden: int = 512, attn: int = 128, n_out: int = 2) -> float:
    """Forward + backward FLOPs of one ABMIL training step on an (n, d) bag.

    Forward: first layer 2ndH, attention 2nHA + 2nA, pooling 2nH, classifier 2HK.
    Backward: first layer weight gradient only (the tiles need none) 2ndH; attention
    weight and input gradients 4nHA + 4nA; pooling and its inputs 4nH; classifier 4HK.
    """
    fwd = 2 * n * d * hidden + 2 * n * hidden * attn + 2 * n * attn + 2 * n * hidden
    fwd += 2 * hidden * n_out
    bwd = 2 * n * d * hidden + 4 * n * hidden * attn + 4 * n * attn + 4 * n * hidden
    bwd += 4 * hidden * n_out
    return float(fwd + bwd)


def _tile_features(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k overlapping gaussian classes with unequal sizes and a common offset."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.12, size=(k, d)).astype(np.float32)
    p = np.linspace(2.0, 1.0, k)
    y = rng.choice(k, n, p=p / p.sum())
    x = rng.standard_normal((n, d), dtype=np.float32)
    x += centres[y] + 0.5
    return x, y


def bench_tiles(
    items: int, dim: int, encoders: int, bootstrap: int
) -> tuple[float, dict[str, float]]:
    """Seconds for every protocol on every encoder's features; per-protocol totals."""
    k = 9
    per: dict[str, float] = {}
    total = 0.0
    for e in range(encoders):
        x, y = _tile_features(items, dim, k, seed=e)
        split = np.random.default_rng(100 + e).choice(3, items, p=[0.7, 0.1, 0.2])
        splits = {s: (x[split == i], y[split == i]) for i, s in enumerate(("train", "val", "test"))}
        for protocol in ("linear", "knn", "fewshot", "retrieval"):
            t0 = time.perf_counter()
            run_tile_protocols(
                splits, n_classes=k, protocols=[protocol], n_resamples=bootstrap, seed=0
            )
            dt = time.perf_counter() - t0
            per[protocol] = per.get(protocol, 0.0) + dt
            total += dt
    return total, per


def bench_abmil(slides: int, tiles: int, dim: int, distinct: int = 8) -> tuple[float, float, float]:
    """(slides/s of the second epoch, bound slides/s, measured fp32 GFLOP/s)."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((tiles, dim), dtype=np.float32) for _ in range(distinct)]
    bags = SlideBags([arrays[i % distinct] for i in range(slides + distinct)])
    labels = np.array([i % 2 for i in range(slides + distinct)])
    train = np.arange(slides)
    val = np.arange(slides, slides + distinct)
    gflops = matmul_gflops(tiles, dim, 512)
    res = train_abmil(
        bags,
        task="classification",
        train=train,
        val=val,
        labels=labels,
        class_names=["a", "b"],
        config=MILConfig(max_epochs=2, patience=5, min_epochs=2),
    )
    sec = res.history[-1]["train_seconds"]  # the second epoch: no first-call overheads
    rate = slides / sec
    bound = gflops * 1e9 / abmil_flops(tiles, dim)
    return rate, bound, gflops


def bench_apply(n: int, dim: int, repeats: int) -> dict[str, float]:
    """Median seconds of apply_slide_model (fp32, bf16) and the matmul floors."""
    import torch

    torch.manual_seed(0)
    net = build_abmil(dim, 2)
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    model = SlideModel(task="classification", embed_dim=dim, state=state, class_names=["a", "b"])
    x = np.random.default_rng(1).standard_normal((n, dim), dtype=np.float32)
    out = {}
    for prec in ("fp32", "bf16"):
        apply_slide_model(model, x[:1000], precision=prec)  # warm-up
        out[prec] = _median_time(lambda p=prec: apply_slide_model(model, x, precision=p), repeats)
        out[f"floor_{prec}"] = (
            2.0 * n * dim * 512 / (matmul_gflops(16384, dim, 512, dtype=prec) * 1e9)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a quick run at small sizes")
    ap.add_argument("--items", type=int, default=None, help="tile-task items (10000)")
    ap.add_argument("--dim", type=int, default=None, help="feature width (1024)")
    ap.add_argument("--encoders", type=int, default=3, help="feature sets (3)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    ap.add_argument("--slides", type=int, default=None, help="ABMIL slides (200)")
    ap.add_argument("--tiles", type=int, default=None, help="tiles per slide (5000)")
    ap.add_argument(
        "--apply-tiles", type=int, default=None, help="tiles of the applied slide (100000)"
    )
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the apply timing (5)")
    args = ap.parse_args(argv)
    small = dict(items=2000, dim=256, slides=20, tiles=1000, apply_tiles=20000)
    full = dict(items=10000, dim=1024, slides=200, tiles=5000, apply_tiles=100000)
    size = small if args.small else full
    for key in size:
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    import torch

    print(f"# bench_eval ({'small' if args.small else 'issue 13'} sizes)")
    print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average at start {_load()}\n")  # fmt: skip
    rows = []
    total, per = bench_tiles(size["items"], size["dim"], args.encoders, args.bootstrap)
    detail = ", ".join(f"{k} {v:.1f} s" for k, v in per.items())
    rows.append(
        (f"tile task: {size['items']} items x {size['dim']}-d x {args.encoders} encoders, all protocols",
         f"{total:.1f} s ({detail})", "<= 120 s", total <= 120)
    )  # fmt: skip
    rate, bound, gflops = bench_abmil(size["slides"], size["tiles"], size["dim"])
    rows.append(
        (f"ABMIL training: {size['slides']} slides x {size['tiles']} tiles x {size['dim']}-d",
         f"{rate:.2f} slides/s = {rate / bound:.2f} x bound ({bound:.2f} slides/s at {gflops:.0f} GFLOP/s)",
         ">= 0.5 x bound", rate >= 0.5 * bound)
    )  # fmt: skip
    ap_ = bench_apply(size["apply_tiles"], size["dim"], args.repeats)
    for prec in ("fp32", "bf16"):
        rows.append(
            (f"apply slide model ({prec}): {size['apply_tiles']} tiles x {size['dim']}-d",
             f"{ap_[prec] * 1e3:.0f} ms (first-layer matmul floor {ap_[f'floor_{prec}'] * 1e3:.0f} ms)",
             "<= 200 ms", ap_[prec] <= 0.2)
        )  # fmt: skip
    print("| measurement | result | target | met |")
    print("|---|---|---|---|")
    for name, result, target, ok in rows:
        print(f"| {name} | {result} | {target} | {'yes' if ok else 'NO'} |")
    print(f"\nload average at end {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
