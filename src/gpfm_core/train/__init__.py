"""GPFM unified knowledge distillation: expert distillation + DINOv2 self-distillation.

``load_config`` (layered YAML), ``train`` (the loop), ``export_checkpoint``; the pieces
(losses, heads, meta-architecture, augmentation, masking, schedules) live in submodules.
Importing this package imports torch; ``gpfm_core.cli._train`` imports it lazily.
"""

from __future__ import annotations

from gpfm_core.train.config import load_config
from gpfm_core.train.export import export_checkpoint
from gpfm_core.train.loop import TrainingDivergedError, train

__all__ = ["TrainingDivergedError", "export_checkpoint", "load_config", "train"]
