"""Loss modules taking plain tensors: DINO, iBOT, KoLeo and the two expert-distillation losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DINOLoss",
    "ExpertCLSLoss",
    "ExpertPatchLoss",
    "KoLeoLoss",
    "TargetStandardizer",
    "iBOTPatchLoss",
]


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class _Centered(nn.Module):
    """Holds the EMA centre of teacher logits (a buffer, so it is checkpointed)."""

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
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA update with the (all-reduced) mean of (M, K) teacher logits."""
        mean = _all_reduce_mean(teacher_logits.float().mean(dim=0, keepdim=True))
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
    KL divergence between their softmax distributions at ``temp``.

    ``forward(student (B, E), expert (B, E)) -> scalar``.
    """

    def __init__(self, kind: str = "cosine", temp: float = 0.1) -> None:
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
        return F.kl_div(logp, q, reduction="batchmean")


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
