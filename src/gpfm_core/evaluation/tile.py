"""Tile (ROI) protocols on frozen features, as the GPFM paper runs them.

Every protocol takes the features of a train split (and a validation split where it needs
one) and returns class scores for the test items; :func:`run_tile_protocols` adds the
metrics with bootstrap intervals. All of them are deterministic under their ``seed``.

* :func:`linear_probe` — one ``nn.Linear`` on the frozen features; AdamW (lr 5e-4, weight
  decay 1e-5), cosine schedule, batch 256, early stopping on validation macro-AUROC (the
  weights of the best validation epoch are kept; ties go to the lower validation loss).
  Features are standardised with the train split's mean / std (the same linear model,
  better conditioned) and small splits get at least ``min_steps`` updates.
* :func:`knn_scores` — cosine similarity, the k most similar training items vote with weight
  ``exp(sim / T)``, T = 0.07 (the weighted kNN of DINO, Caron et al. 2021, ``eval_knn.py``),
  k = 1 and 20.
* :func:`few_shot` — n labelled items per class, drawn again for each repeat; SimpleShot's
  nearest class prototype on centred, L2-normalised features (Wang et al. 2019, "SimpleShot",
  the few-shot protocol of UNI, Chen et al. 2024); reported as mean ± sd over repeats.
* :func:`retrieval` — features z-scored with the train mean / std, L2 nearest training
  items; the top K (K = number of classes) vote for their class with weight 1 / rank; classes
  are ranked by their votes (ties, including classes without a vote, by their nearest
  training item). Top-m accuracy: the true class is among the first m; macro = averaged over
  classes.

The heavy maths (similarities, distances) are blocked float32 matrix products in torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpfm_core.errors import GpfmError
from gpfm_core.evaluation._util import torch_threads
from gpfm_core.evaluation.metrics import (
    CLASSIFICATION_METRICS,
    Estimate,
    bootstrap_counts,
    classification_with_ci,
    fast_classification_metrics,
    summarise,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "LinearProbeConfig",
    "ProtocolResult",
    "few_shot",
    "knn_scores",
    "linear_probe",
    "retrieval",
    "run_tile_protocols",
]

log = logging.getLogger(__name__)

#: Query rows per similarity / distance block (bounds memory: block x N_train floats).
_BLOCK = 2048
PROTOCOLS = ("linear", "knn", "fewshot", "retrieval")


@dataclass(frozen=True)
class LinearProbeConfig:
    """Hyper-parameters of the paper's linear probe (defaults are the paper's).

    An epoch is one pass over the train split, but at least ``min_steps / max_epochs``
    batches: a small split (a few hundred items are one or two batches) otherwise stops
    after a few hundred tiny Adam steps, far from the optimum the protocol is meant to reach.
    """

    lr: float = 5e-4
    weight_decay: float = 1e-5
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 10
    min_steps: int = 1000


@dataclass
class ProtocolResult:
    """One protocol's outcome on the test split.

    Attributes
    ----------
    protocol
        ``"linear"``, ``"knn-1"``, ``"knn-20"``, ``"fewshot-4"``, ``"retrieval"`` ...
    metrics
        Metric name -> :class:`Estimate` (few-shot: the mean over repeats, with ``sd``).
    scores
        (N_test, K) class scores used for ROC curves, or None.
    info
        Protocol details for the report (best epoch, repeats ...).
    """

    protocol: str
    metrics: dict[str, Estimate]
    scores: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_split(x: np.ndarray, y: np.ndarray, name: str, n_classes: int) -> None:
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise GpfmError(f"{name}: features must be (N, D) with one label each")
    if x.shape[0] == 0:
        raise GpfmError(f"{name} split is empty: give it items in the task CSV")
    if y.min() < 0 or y.max() >= n_classes:
        raise GpfmError(f"{name}: labels must lie in 0..{n_classes - 1}")


# ----------------------------------------------------------------------------- linear probe
def _adamw(params: Iterator, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where torch offers it (the same update)."""
    import torch

    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a torch without fused CPU AdamW
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    *,
    n_classes: int,
    config: LinearProbeConfig | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Train one linear layer on frozen features; return softmax scores of the test items.

    Parameters
    ----------
    x_train, y_train, x_val, y_val, x_test
        (N, D) float features and (N,) int labels of each split.
    n_classes
        K.
    config
        Hyper-parameters (default: the paper's).
    seed
        Seeds the initial weights and the batch order.

    Returns
    -------
    tuple
        ``scores`` (N_test, K) float32 probabilities and ``info`` (``best_epoch``,
        ``epochs``, ``val_auroc``).
    """
    import torch
    import torch.nn.functional as F

    cfg = config or LinearProbeConfig()
    # standardised with the train split's statistics: the same linear model, better conditioned
    mean = np.asarray(x_train, dtype=np.float64).mean(axis=0)
    std = np.asarray(x_train, dtype=np.float64).std(axis=0)
    std[std < 1e-8] = 1.0
    xtr, xva, xte = (
        torch.from_numpy(_f32((np.asarray(a, dtype=np.float64) - mean) / std))
        for a in (x_train, x_val, x_test)
    )
    ytr = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    yva = np.asarray(y_val, dtype=np.int64)
    n, d = xtr.shape
    steps_per_epoch = max(math.ceil(n / cfg.batch_size), math.ceil(cfg.min_steps / cfg.max_epochs))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(d, n_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = _adamw(layer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs * steps_per_epoch)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of a fresh permutation after each pass, forever.

        Each pass gathers the shuffled split once, so a batch is a contiguous slice (a
        per-batch gather costs as much as the batch's whole forward pass).
        """
        while True:
            perm = torch.randperm(n, generator=gen)
            xs, ys = xtr[perm], ytr[perm]
            for start in range(0, n, cfg.batch_size):
                yield xs[start : start + cfg.batch_size], ys[start : start + cfg.batch_size]

    stream = batches()

    def val_score() -> tuple[float, float]:
        """(macro-AUROC, -cross-entropy) on the validation split: higher is better."""
        with torch.no_grad():
            z = layer(xva)
            p = torch.softmax(z, dim=1).numpy()
            ce = float(F.cross_entropy(z, torch.from_numpy(yva)))
        auc = fast_classification_metrics(yva, p)["auroc_macro"]
        return (-math.inf if math.isnan(auc) else auc, -ce)

    # early stopping on validation macro-AUROC; ties (a saturated AUROC on a small
    # validation split) go to the lower validation loss
    best = ((-math.inf, -math.inf), 0, {k: v.clone() for k, v in layer.state_dict().items()})
    since_best, epoch = 0, 0
    # (256, D) x (D, K) steps are far too small to split across threads: with more than one,
    # each step waits on the others (10-40x slower on a busy machine)
    with torch.enable_grad(), torch_threads(1):
        for epoch in range(1, cfg.max_epochs + 1):
            for _ in range(steps_per_epoch):
                xb, yb = next(stream)
                loss = F.cross_entropy(layer(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            score = val_score()
            if score > best[0]:
                best = (score, epoch, {k: v.clone() for k, v in layer.state_dict().items()})
                since_best = 0
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    break
    layer.load_state_dict(best[2])
    with torch.no_grad():
        scores = torch.softmax(layer(xte), dim=1).numpy()
    info = {"best_epoch": best[1], "epochs": epoch, "val_auroc": float(best[0][0])}
    return scores.astype(np.float32), info


# ---------------------------------------------------------------------------------- kNN
def knn_scores(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    n_classes: int,
    ks: Sequence[int] = (1, 20),
    temperature: float = 0.07,
) -> dict[int, np.ndarray]:
    """Weighted cosine kNN (DINO): class scores of the test items for each k.

    Parameters
    ----------
    x_train, y_train, x_test
        Features (N, D) and train labels (N,).
    n_classes
        K.
    ks
        Neighbour counts (capped at the train size).
    temperature
        T of the ``exp(sim / T)`` vote weights.

    Returns
    -------
    dict
        k -> (N_test, K) float32 scores normalised to sum 1 (k = 1: one-hot).
    """
    import torch

    from gpfm_core.analysis.similarity import normalize_rows

    tr = torch.from_numpy(normalize_rows(x_train))
    te = torch.from_numpy(normalize_rows(x_test))
    ytr = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    kmax = min(max(ks), tr.shape[0])
    out = {int(k): np.zeros((te.shape[0], n_classes), np.float32) for k in ks}
    with torch.no_grad():
        for start in range(0, te.shape[0], _BLOCK):
            sims = te[start : start + _BLOCK] @ tr.T
            top, idx = torch.topk(sims, kmax, dim=1)  # sorted, most similar first
            labels = ytr[idx]
            # exp((s - s_max) / T): the same normalised weights, no overflow
            w = torch.exp((top - top[:, :1]) / temperature)
            for k in ks:
                kk = min(int(k), kmax)
                votes = torch.zeros(top.shape[0], n_classes)
                votes.scatter_add_(1, labels[:, :kk], w[:, :kk])
                votes /= votes.sum(dim=1, keepdim=True)
                out[int(k)][start : start + top.shape[0]] = votes.numpy()
    return out


# ----------------------------------------------------------------------------- few-shot
def _simpleshot(
    support: np.ndarray, y_support: np.ndarray, query: np.ndarray, n_classes: int
) -> np.ndarray:
    """Nearest prototype on centred, L2-normalised features -> (N, K) softmax(-d^2)."""
    import torch

    from gpfm_core.analysis.similarity import normalize_rows

    mean = support.mean(axis=0, keepdims=True)
    s = torch.from_numpy(normalize_rows(support - mean))
    q = torch.from_numpy(normalize_rows(query - mean))
    protos = torch.zeros(n_classes, s.shape[1]).index_add_(
        0, torch.from_numpy(y_support.astype(np.int64)), s
    )
    protos /= torch.bincount(torch.from_numpy(y_support.astype(np.int64)), minlength=n_classes)[
        :, None
    ].clamp(min=1)
    d2 = torch.cdist(q, protos) ** 2
    return torch.softmax(-d2, dim=1).numpy()


def few_shot(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    n_classes: int,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    repeats: int = 5,
    seed: int = 0,
) -> list[ProtocolResult]:
    """SimpleShot few-shot: for each n, ``repeats`` draws of n training items per class.

    Parameters
    ----------
    x_train, y_train, x_test, y_test
        Features (N, D) and labels (N,) of the train and test splits.
    n_classes
        K.
    shots
        Items per class; an n larger than the smallest training class is skipped.
    repeats
        Draws per n, each seeded from ``seed``.

    Returns
    -------
    list of ProtocolResult
        One per n (``"fewshot-<n>"``): metric means over repeats, with ``sd``.
    """
    x = _f32(x_train)
    y = np.asarray(y_train, dtype=np.int64)
    by_class = [np.flatnonzero(y == c) for c in range(n_classes)]
    results = []
    with torch_threads(1):  # small products: threads would only wait on each other
        for n in shots:
            results.extend(_few_shot_n(x, y, by_class, x_test, y_test, n, n_classes, repeats, seed))
    return results


def _few_shot_n(
    x: np.ndarray,
    y: np.ndarray,
    by_class: list[np.ndarray],
    x_test: np.ndarray,
    y_test: np.ndarray,
    n: int,
    n_classes: int,
    repeats: int,
    seed: int,
) -> list[ProtocolResult]:
    """``repeats`` draws of n items per class -> one result (none if a class is too small)."""
    smallest = min(len(i) for i in by_class)
    if n > smallest:
        log.info("few-shot n=%d skipped: the smallest class has %d training items", n, smallest)
        return []
    runs: dict[str, list[float]] = {m: [] for m in CLASSIFICATION_METRICS}
    query = _f32(x_test)
    for r in range(repeats):
        rng = np.random.default_rng([seed, int(n), r])
        pick = np.concatenate([rng.choice(i, size=n, replace=False) for i in by_class])
        scores = _simpleshot(x[pick], y[pick], query, n_classes)
        for m, v in fast_classification_metrics(y_test, scores).items():
            runs[m].append(v)
    metrics = {m: Estimate(*_mean_sd(vals)) for m, vals in runs.items()}
    return [ProtocolResult(f"fewshot-{n}", metrics, info={"shots": int(n), "repeats": repeats})]


def _mean_sd(values: list[float]) -> tuple[float, float, float, float]:
    mean, sd = summarise(values)
    return mean, float("nan"), float("nan"), sd


# ---------------------------------------------------------------------------- retrieval
def _class_ranking(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int
) -> np.ndarray:
    """(N_test, K) class indices, best first, by rank-weighted votes of the top-K items."""
    import torch

    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std[std < 1e-8] = 1.0
    tr = torch.from_numpy(_f32((x_train - mean) / std))
    te = torch.from_numpy(_f32((x_test - mean) / std))
    ytr = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    k = min(n_classes, tr.shape[0])
    sq_tr = (tr * tr).sum(dim=1)
    members = [torch.from_numpy(np.flatnonzero(y_train == c)) for c in range(n_classes)]
    rank_weight = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    out = np.empty((te.shape[0], n_classes), np.int64)
    with torch.no_grad():
        for start in range(0, te.shape[0], _BLOCK):
            q = te[start : start + _BLOCK]
            d2 = torch.addmm(sq_tr[None, :], q, tr.T, alpha=-2.0) + (q * q).sum(dim=1)[:, None]
            _, idx = torch.topk(d2, k, dim=1, largest=False)  # nearest first
            votes = torch.zeros(q.shape[0], n_classes)
            votes.scatter_add_(1, ytr[idx], rank_weight.expand(q.shape[0], k).contiguous())
            nearest = torch.stack(
                [
                    d2[:, m].min(dim=1).values if m.numel() else torch.full((q.shape[0],), math.inf)
                    for m in members
                ],
                dim=1,
            )
            # more votes first; among equal votes, the class with the nearer item first
            order = np.lexsort((nearest.numpy(), -votes.numpy()), axis=1)
            out[start : start + q.shape[0]] = order
    return out


def retrieval(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    n_classes: int,
    top: Sequence[int] = (1, 3, 5),
    n_resamples: int = 1000,
    seed: int = 0,
) -> ProtocolResult:
    """Rank-weighted kNN retrieval: macro top-m accuracy with bootstrap intervals.

    Parameters
    ----------
    x_train, y_train, x_test, y_test
        Features (N, D) and labels (N,).
    n_classes
        K; also the number of retrieved items that vote.
    top
        The m of the top-m accuracies; m >= K is left out (it is always 1).
    n_resamples, seed
        Bootstrap of the intervals.

    Returns
    -------
    ProtocolResult
        ``"retrieval"`` with metrics ``top<m>_macro``.
    """
    y = np.asarray(y_test, dtype=np.int64)
    ranking = _class_ranking(_f32(x_train), np.asarray(y_train), _f32(x_test), n_classes)
    pos = np.argmax(ranking == y[:, None], axis=1)  # rank of the true class, 0 = first
    present = [c for c in range(n_classes) if (y == c).any()]
    onehot = np.eye(n_classes)[y][:, present]  # (N, C_present)
    counts = (
        bootstrap_counts(y.size, n_resamples=n_resamples, seed=seed) if n_resamples > 0 else None
    )
    metrics = {}
    for m in top:
        if m >= n_classes:
            continue
        hit = (pos < m).astype(np.float64)
        value = float(np.mean([hit[y == c].mean() for c in present]))
        est = Estimate(value)
        if counts is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                per_class = (counts @ (onehot * hit[:, None])) / (counts @ onehot)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                samples = np.nanmean(per_class, axis=1)
            samples = samples[np.isfinite(samples)]
            lo, hi = np.quantile(samples, [0.025, 0.975]) if samples.size else (np.nan, np.nan)
            est = Estimate(value, float(lo), float(hi))
        metrics[f"top{m}_macro"] = est
    return ProtocolResult("retrieval", metrics, info={"voters": min(n_classes, len(y_train))})


# ------------------------------------------------------------------------------ driver
def run_tile_protocols(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    n_classes: int,
    protocols: Sequence[str] = PROTOCOLS,
    linear: LinearProbeConfig | None = None,
    knn_k: Sequence[int] = (1, 20),
    knn_temperature: float = 0.07,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    repeats: int = 5,
    n_resamples: int = 1000,
    seed: int = 0,
) -> list[ProtocolResult]:
    """Every requested protocol on one encoder's features of one task.

    Parameters
    ----------
    splits
        ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` with x (N, D), y (N,) int.
    n_classes
        K.
    protocols
        Any of ``"linear"``, ``"knn"``, ``"fewshot"``, ``"retrieval"``.
    linear, knn_k, knn_temperature, shots, repeats
        Protocol options (defaults: the paper's).
    n_resamples, seed
        Bootstrap resamples of the 95 % intervals and the seed of everything random.

    Returns
    -------
    list of ProtocolResult
    """
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise GpfmError(f"unknown protocol(s) {sorted(unknown)}: choose from {list(PROTOCOLS)}")
    for name in ("train", "val", "test"):
        if name not in splits:
            raise GpfmError(f"the task has no {name!r} split: name one in the CSV's split column")
        _check_split(*splits[name], name, n_classes)
    (xtr, ytr), (xva, yva), (xte, yte) = splits["train"], splits["val"], splits["test"]
    if len(np.unique(ytr)) < 2:
        raise GpfmError("the train split holds one class only: every class needs train items")
    out: list[ProtocolResult] = []

    def scored(name: str, scores: np.ndarray, info: dict | None = None) -> ProtocolResult:
        est = classification_with_ci(yte, scores, n_resamples=n_resamples, seed=seed)
        return ProtocolResult(name, est, scores, info or {})

    if "linear" in protocols:
        scores, info = linear_probe(
            xtr, ytr, xva, yva, xte, n_classes=n_classes, config=linear, seed=seed
        )
        out.append(scored("linear", scores, info))
    if "knn" in protocols:
        for k, scores in knn_scores(
            xtr, ytr, xte, n_classes=n_classes, ks=knn_k, temperature=knn_temperature
        ).items():
            out.append(scored(f"knn-{k}", scores, {"k": k, "temperature": knn_temperature}))
    if "fewshot" in protocols:
        out.extend(
            few_shot(
                xtr, ytr, xte, yte, n_classes=n_classes, shots=shots, repeats=repeats, seed=seed
            )
        )
    if "retrieval" in protocols:
        out.append(
            retrieval(xtr, ytr, xte, yte, n_classes=n_classes, n_resamples=n_resamples, seed=seed)
        )
    return out
