"""Loss modules taking plain tensors: DINO, iBOT, KoLeo and the two expert-distillation losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CENTERINGS",
    "DINOLoss",
    "ExpertCLSLoss",
    "ExpertPatchLoss",
    "KoLeoLoss",
    "TargetStandardizer",
    "iBOTPatchLoss",
]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) across ranks; a no-op in one process."""
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a new tensor; ``x`` is untouched)."""
    if not _distributed():
        return x
    return _all_reduce_(x.clone()) / dist.get_world_size()


#: Teacher target normalisations: DINO's EMA centring, or DINOv2's Sinkhorn-Knopp.
CENTERINGS = ("centering", "sinkhorn_knopp")


class _Centered(nn.Module):
    """Turns teacher logits into targets: EMA centring (DINO, iBOT) or Sinkhorn-Knopp (DINOv2).

    Holds the EMA centre of teacher logits as a buffer, so it is checkpointed (it stays at 0
    under Sinkhorn-Knopp, which needs no state).
    """

    def __init__(self, out_dim: int, student_temp: float, center_momentum: float) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """(..., K) logits -> (..., K) probabilities ``softmax((t - c) / temp)``."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """(M, K) logits -> (M, K) probabilities, equipartitioned over the (global) batch.

        SwAV's Sinkhorn-Knopp as DINOv2 uses it in place of centring: alternately normalise
        the prototypes' total mass to 1/K and every sample's to 1/M (M summed over ranks), so
        the teacher cannot pile the batch onto a few prototypes, and needs no running state.
        Rows sum to 1. With far fewer rows than prototypes (small CPU batches) the targets
        stay close to uniform until the head's outputs differ between samples.
        """
        # float64: logits are cosines / temperature (|x| <= 25 at 0.04), exp() stays normal
        logits = teacher_logits.double() / teacher_temp
        # a global constant shift leaves the result unchanged and keeps exp() finite
        local_peak = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
        peak = _all_reduce_(local_peak.detach().clone(), "max")
        q = torch.exp(logits - peak).t()  # (K, M)
        n_rows = _all_reduce_(torch.tensor(float(q.shape[1]), device=q.device))
        k = q.shape[0]
        q /= _all_reduce_(q.sum())
        for _ in range(n_iterations):
            q /= _all_reduce_(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)
            q /= k
            q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
            q /= n_rows
        q *= n_rows
        return q.t().to(torch.float32)

    @torch.no_grad()
    def teacher_targets(
        self, teacher_logits: torch.Tensor, teacher_temp: float, centering: str
    ) -> torch.Tensor:
        """(M, K) teacher logits -> (M, K) targets by ``centering`` (see :data:`CENTERINGS`).

        With EMA centring the centre is updated from these logits afterwards.
        """
        if centering == "sinkhorn_knopp":
            return self.sinkhorn_knopp_teacher(teacher_logits, teacher_temp)
        if centering != "centering":
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        probs = self.softmax_center_teacher(teacher_logits, teacher_temp)
        self.update_center(teacher_logits)
        return probs

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA update with the mean of (M, K) teacher logits over all ranks.

        Summed with the row count so that a rank (or a step) without rows, e.g. no masked
        patches for iBOT, neither divides by zero nor skips the collective.
        """
        x = teacher_logits.float()
        stats = torch.cat([x.sum(dim=0), x.new_tensor([float(x.shape[0])])])
        stats = _all_reduce_(stats)
        if stats[-1] > 0:
            mean = (stats[:-1] / stats[-1])[None, :]
            self.center.mul_(self.center_momentum).add_(mean * (1 - self.center_momentum))


class DINOLoss(_Centered):
    """Cross-entropy between centred, sharpened teacher CLS prototypes and student ones.

    ``forward(student_logits (S, B, K), teacher_probs (T, B, K)) -> scalar``: averaged over
    all (teacher view t, student view s) pairs with ``s != t`` (the first T student views are
    the global crops the teacher saw).
    """

    def __init__(
        self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__(out_dim, student_temp, center_momentum)

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # (S, B, K)
        total = student_logits.new_zeros((), dtype=torch.float32)
        pairs = 0
        for t in range(teacher_probs.shape[0]):
            for s in range(logp.shape[0]):
                if s == t:
                    continue
                total = total - (teacher_probs[t] * logp[s]).sum(dim=-1).mean()
                pairs += 1
        return total / max(pairs, 1)


class iBOTPatchLoss(_Centered):
    """Masked-patch cross-entropy: ``forward(student (M, K), teacher_probs (M, K), weights (M,))``.

    ``weights`` are ``1 / masked patches in that crop`` so every masked crop counts equally;
    the sum is divided by the number of crops ``n_crops``.
    """

    def __init__(
        self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__(out_dim, student_temp, center_momentum)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        weights: torch.Tensor,
        n_crops: int,
    ) -> torch.Tensor:
        logp = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        per_token = -(teacher_probs * logp).sum(dim=-1)  # (M,)
        return (per_token * weights).sum() / max(n_crops, 1)


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator: ``-mean log(min_j ||x_i - x_j||)`` on L2-normalised
    (B, D) features; spreads the batch over the sphere."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1, eps=self.eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)
            nn_idx = dots.argmax(dim=1)
        dist_nn = F.pairwise_distance(x, x[nn_idx], p=2, eps=self.eps)
        return -torch.log(dist_nn + self.eps).mean()


class ExpertCLSLoss(nn.Module):
    """Student CLS (through the expert head) vs the expert's CLS: ``1 - cos`` (default) or the
    KL divergence between their softmax distributions at ``temp``, times ``temp²`` (GPFM's
    ``kl_loss.py`` ``KLDiv``, used there at ``temp = 1``).

    ``forward(student (B, E), expert (B, E)) -> scalar``.
    """

    def __init__(self, kind: str = "cosine", temp: float = 1.0) -> None:
        super().__init__()
        if kind not in ("cosine", "kl"):
            raise ValueError(f"kind must be cosine or kl, got {kind!r}")
        self.kind = kind
        self.temp = temp

    def forward(self, student: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        student, expert = student.float(), expert.float()
        if self.kind == "cosine":
            return (1 - F.cosine_similarity(student, expert, dim=-1)).mean()
        logp = F.log_softmax(student / self.temp, dim=-1)
        q = F.softmax(expert / self.temp, dim=-1)
        # temp² keeps the gradient's scale independent of temp (Hinton et al.)
        return F.kl_div(logp, q, reduction="batchmean") * self.temp**2


class ExpertPatchLoss(nn.Module):
    """Patch tokens vs the expert's (resized) patch tokens:
    ``cos_weight * (1 - cos) + l1_weight * SmoothL1``, averaged over tokens.

    ``forward(student (B, N, E), expert (B, N, E)) -> scalar``.
    """

    def __init__(self, cos_weight: float = 0.9, l1_weight: float = 0.1) -> None:
        super().__init__()
        self.cos_weight = cos_weight
        self.l1_weight = l1_weight

    def forward(self, student: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        student, expert = student.float(), expert.float()
        cos = (1 - F.cosine_similarity(student, expert, dim=-1)).mean()
        return self.cos_weight * cos + self.l1_weight * F.smooth_l1_loss(student, expert)


class TargetStandardizer(nn.Module):
    """Running per-channel mean/std of an expert's features (EMA, all-reduced); ``forward``
    returns ``(x - mean) / std``. Optional (``expert_loss.standardize``): random or strongly
    anisotropic experts have one dominant direction that plain cosine targets reduce to
    (as AM-RADIO's PHI-S standardisation addresses). Buffers are checkpointed.
    """

    def __init__(self, dim: int, momentum: float = 0.99, eps: float = 1e-6) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """EMA update from (M, E) features (the first batch sets the statistics)."""
        x = x.float().reshape(-1, x.shape[-1])
        mean = _all_reduce_mean(x.mean(0))
        var = _all_reduce_mean((x - mean).pow(2).mean(0))
        m = self.momentum if bool(self.initialised) else 0.0
        self.mean.mul_(m).add_(mean * (1 - m))
        self.var.mul_(m).add_(var * (1 - m))
        self.initialised.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., E) -> standardised (..., E)."""
        return (x.float() - self.mean) / torch.sqrt(self.var + self.eps)
