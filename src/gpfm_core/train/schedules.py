"""Per-step schedules (DINOv2): cosine lr with warm-up, weight decay, teacher momentum and
teacher temperature warm-up. All are pure functions of the step (so resuming is exact)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Schedules", "cosine"]


def cosine(
    step: int, total: int, start: float, end: float, *, warmup: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup`` steps, then a cosine from
    ``start`` to ``end`` over the remaining ``total - warmup`` steps (constant ``end`` after)."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / max(warmup, 1)
    span = max(total - warmup, 1)
    t = min(step - warmup, span) / span
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedules:
    """The four schedules of a run; ``at(step)`` gives their values."""

    total_steps: int
    warmup_steps: int
    lr: float
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float
    teacher_temp_start: float
    teacher_temp: float
    teacher_temp_warmup: int
    freeze_last_layer_steps: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, lr: float) -> Schedules:
        """From the resolved config; ``lr`` is the peak (already batch-scaled) learning rate."""
        o, t = cfg["optim"], cfg["teacher"]
        return cls(
            total_steps=o["total_steps"],
            warmup_steps=o["warmup_steps"],
            lr=lr,
            min_lr=o["min_lr"],
            weight_decay=o["weight_decay"],
            weight_decay_end=o["weight_decay_end"],
            momentum=t["momentum_teacher"],
            momentum_end=t["final_momentum_teacher"],
            teacher_temp_start=t["warmup_teacher_temp"],
            teacher_temp=t["teacher_temp"],
            teacher_temp_warmup=t["warmup_teacher_temp_steps"],
            freeze_last_layer_steps=o["freeze_last_layer_steps"],
        )

    def at(self, step: int) -> dict[str, float]:
        """``{"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}`` at ``step`` (0-based)."""
        lr = cosine(step, self.total_steps, self.lr, self.min_lr, warmup=self.warmup_steps)
        if step < self.teacher_temp_warmup:
            temp = (
                self.teacher_temp_start
                + (self.teacher_temp - self.teacher_temp_start) * step / self.teacher_temp_warmup
            )
        else:
            temp = self.teacher_temp
        return {
            "lr": lr,
            "wd": cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            "momentum": cosine(step, self.total_steps, self.momentum, self.momentum_end),
            "teacher_temp": temp,
            "last_layer_lr": 0.0 if step < self.freeze_last_layer_steps else lr,
        }
