"""Projection heads: the DINO/iBOT prototype head and the per-expert distillation head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "ExpertHead"]


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (DINOv2).

    Parameters
    ----------
    in_dim : int
        Backbone feature dim ``D``.
    out_dim : int
        Number of prototypes ``K``.
    hidden_dim, bottleneck_dim, nlayers : int
        MLP shape.
    train_gain : bool
        The weight-norm gain ``g`` of the prototypes starts at 1 and is trained (DINOv2, GPFM:
        ``layers/dino_head.py`` fills ``weight_g`` with 1 and leaves it trainable); False keeps
        it at 1 (DINO's ``norm_last_layer``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        train_gain: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad_(train_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., K) prototype logits."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class ExpertHead(nn.Module):
    """Maps student tokens to one expert's feature space (shared by CLS and patch tokens).

    ``Linear(D -> hidden) -> L2-normalise -> weight-normalised Linear(hidden -> D_expert)``.
    GPFM's head is DINOv2's ``DINOHead(nlayers=1, bottleneck_dim=256)``: no bias in the last
    layer, gain ``g`` initialised to 1 and trained (``bias=False, gain=1.0``, the defaults).

    Parameters
    ----------
    bias : bool
        Bias in the last layer (zero-initialised).
    gain : float or None
        Initial weight-norm gain of every output; None keeps torch's (``g = |w|`` per row).
    """

    def __init__(
        self,
        in_dim: int,
        expert_dim: int,
        *,
        hidden_dim: int = 256,
        bias: bool = False,
        gain: float | None = 1.0,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden_dim)
        _init(self.proj)
        self.last_layer = weight_norm(nn.Linear(hidden_dim, expert_dim, bias=bias))
        if bias:
            nn.init.zeros_(self.last_layer.bias)
        if gain is not None:
            self.last_layer.parametrizations.weight.original0.data.fill_(float(gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D_expert)."""
        return self.last_layer(F.normalize(self.proj(x), dim=-1))
