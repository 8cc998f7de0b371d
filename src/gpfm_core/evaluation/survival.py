"""Discrete-time survival: time bins and the negative log-likelihood of a hazard model.

The recipe of PORPOISE / Patch-GCN / MCAT (Chen et al., mahmoodlab), used by the GPFM paper
for its survival tasks:

* **bins** — the follow-up times of the *uncensored* cases are cut into ``n_bins`` quantile
  bins (``pd.qcut``); the outer edges are widened to cover every case; every case gets the
  bin of its time (``pd.cut(..., right=False)``). Here the edges come from the training
  split only, so nothing of the test split leaks into the targets.
* **model output** — ``n_bins`` logits ``h``; hazards ``sigmoid(h)``; survival
  ``S = cumprod(1 - hazards)``; risk ``-sum(S)`` (higher = earlier event).
* **loss** — the negative log-likelihood of the discrete-time model (Zadeh & Schmid 2020,
  "Bias in cross-entropy-based training of deep survival networks", IEEE TPAMI), as in
  PORPOISE's ``utils/loss_func.py::nll_loss`` with its default ``alpha = 0``.

``censorship`` follows the same convention as those repositories: 1 = censored (alive at last
follow-up), 0 = event observed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    import torch

__all__ = ["assign_bins", "nll_survival_loss", "risk_from_logits", "survival_bins"]


def survival_bins(
    time: np.ndarray, censorship: np.ndarray, *, n_bins: int = 4, eps: float = 1e-6
) -> np.ndarray:
    """Bin edges from the quantiles of the uncensored times (PORPOISE's ``qcut``).

    Parameters
    ----------
    time
        (N,) follow-up times (e.g. ``survival_months``).
    censorship
        (N,) 1 = censored, 0 = event.
    n_bins
        Number of bins.
    eps
        Widening of the outer edges.

    Returns
    -------
    numpy.ndarray
        (n_bins + 1,) increasing float64 edges; the first lies below every time, the last
        above.

    Raises
    ------
    GpfmError
        Fewer uncensored cases than bins, or times that do not give distinct quantiles.
    """
    t = np.asarray(time, dtype=np.float64)
    c = np.asarray(censorship)
    events = t[c == 0]
    if events.size < n_bins:
        raise GpfmError(
            f"only {events.size} uncensored case(s) for {n_bins} survival bins: "
            "add cases with events or lower n_bins"
        )
    edges = np.quantile(events, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0] = t.min() - eps
    edges[-1] = t.max() + eps
    if np.any(np.diff(edges) <= 0):
        raise GpfmError(
            "survival times do not give distinct quantile bins (too many equal times): lower n_bins"
        )
    return edges


def assign_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each time (``[edge_i, edge_{i+1})``; outside times go to the end bins)."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    return np.clip(np.searchsorted(e, t, side="right") - 1, 0, e.size - 2).astype(np.int64)


def nll_survival_loss(
    logits: torch.Tensor,
    bins: torch.Tensor,
    censorship: torch.Tensor,
    *,
    alpha: float = 0.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood (PORPOISE ``nll_loss``), batch mean.

    Parameters
    ----------
    logits
        (B, n_bins) network outputs; hazards are ``sigmoid(logits)``.
    bins
        (B,) int64 bin of each case's time.
    censorship
        (B,) 1 = censored, 0 = event.
    alpha
        Extra weight on the uncensored term: ``(1 - alpha) * nll + alpha * uncensored``.
    eps
        Lower bound inside the logs.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    import torch

    y = bins.reshape(-1, 1).long()
    c = censorship.reshape(-1, 1).to(logits.dtype)
    hazards = torch.sigmoid(logits)
    surv = torch.cumprod(1 - hazards, dim=1)
    surv_padded = torch.cat([torch.ones_like(c), surv], dim=1)  # S(-1) = 1
    s_prev = torch.gather(surv_padded, 1, y).clamp(min=eps)
    h_this = torch.gather(hazards, 1, y).clamp(min=eps)
    s_this = torch.gather(surv_padded, 1, y + 1).clamp(min=eps)
    uncensored = -(1 - c) * (torch.log(s_prev) + torch.log(h_this))
    censored = -c * torch.log(s_this)
    loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


def risk_from_logits(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hazards, survival and risk from (..., n_bins) logits.

    Returns
    -------
    tuple of numpy.ndarray
        ``hazards`` and ``survival`` (..., n_bins), ``risk`` (...) = ``-sum(survival)``.
    """
    z = np.asarray(logits, dtype=np.float64)
    hazards = 1.0 / (1.0 + np.exp(-z))
    surv = np.cumprod(1.0 - hazards, axis=-1)
    return hazards, surv, -surv.sum(axis=-1)
