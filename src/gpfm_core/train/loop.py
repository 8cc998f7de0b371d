"""The training loop, as small functions: ``build`` -> (``train_step`` -> ``log_step`` ->
``save``)* ; ``train`` runs them. Single process or torchrun (``train.strategy``: DDP or FSDP;
gloo on CPU, NCCL on CUDA). Micro-batches come from a DataLoader of ``data.num_workers``
processes over the compiled tile index (:mod:`gpfm_core.train.loader`); teacher snapshots
(:mod:`gpfm_core.train.snapshots`) and the evaluation hook (:mod:`gpfm_core.train.eval_hook`)
run every ``train.snapshot_every`` / ``eval.every`` steps."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpfm_core._atomic import write_atomic
from gpfm_core.errors import ConfigError, GpfmError
from gpfm_core.train.augment import MultiCropAugment
from gpfm_core.train.checkpoint import (
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from gpfm_core.train.config import dump_config
from gpfm_core.train.data import TileDataset, build_dataset, check_data_config, index_path
from gpfm_core.train.distributed import (
    DistInfo,
    full_state_dicts,
    init_distributed,
    load_sharded_optimizer,
    reshard,
    shard_model,
)
from gpfm_core.train.eval_hook import EVAL_COLUMNS, build_eval_set, check_eval_config, evaluate
from gpfm_core.train.loader import MicroBatches, iterate, make_loader
from gpfm_core.train.logging_csv import MetricsLogger, reduce_across_ranks
from gpfm_core.train.meta_arch import UnifiedDistillation, check_init_weights
from gpfm_core.train.models import load_expert
from gpfm_core.train.optim import apply_schedules, build_optimizer, scaled_lr
from gpfm_core.train.schedules import Schedules
from gpfm_core.train.snapshots import save_snapshot

__all__ = [
    "TrainState",
    "TrainingDivergedError",
    "build",
    "clip_gradients",
    "save",
    "train",
    "train_step",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


class TrainingDivergedError(GpfmError):
    """A loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Everything a step needs."""

    cfg: dict[str, Any]
    out_dir: Path
    dist: DistInfo
    model: UnifiedDistillation
    wrapped: nn.Module  # DDP(model) under torchrun with strategy ddp, else model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: Schedules
    dataset: TileDataset
    augment: MultiCropAugment
    amp_dtype: torch.dtype | None
    step: int = 0
    last_checkpoint: Path | None = None
    tiles_skipped: int = 0  # unreadable tiles replaced since the last logged step (this rank)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def sharded(self) -> bool:
        """FSDP: several processes and ``train.strategy: fsdp``."""
        return self.dist.enabled and self.cfg["train"]["strategy"] == "fsdp"

    @property
    def global_batch(self) -> int:
        o = self.cfg["optim"]
        return o["batch_size"] * o["accum_steps"] * self.dist.world_size


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(
    cfg: dict[str, Any], out_dir: str | os.PathLike[str], *, resume: bool = False
) -> TrainState:
    """Create (or restore with ``resume``) the whole training state.

    Raises
    ------
    ConfigError
        ``resume`` without a checkpoint in ``out_dir``, or a bad config value.
    EncoderError
        An expert cannot be loaded.
    """
    out = Path(out_dir)
    check_data_config(cfg)
    check_eval_config(cfg)
    ckpt = None
    if resume:
        if not (out / CHECKPOINT_NAME).is_file():
            raise ConfigError(
                f"--resume: no {CHECKPOINT_NAME} in {out}; run without --resume first"
            )
        ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    dist = init_distributed(str(cfg["device"]))
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    _seed_all(int(cfg["seed"]))  # identical initial weights on every rank
    if ckpt is None:
        check_init_weights(cfg["student"])  # before the experts take minutes to load
    experts = [load_expert(spec, device=dist.device) for spec in cfg["experts"]]
    model = UnifiedDistillation(cfg, experts, load_init=ckpt is None).to(dist.device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])  # full names, before any sharding
    sharded = dist.enabled and cfg["train"]["strategy"] == "fsdp"
    if sharded:
        shard_model(model)  # before the optimiser: sharding replaces the parameters
    o = cfg["optim"]
    optimizer = build_optimizer(model.student, cfg, num_layers=model.backbone.num_layers)
    amp = _amp_dtype(cfg["train"]["precision"], dist.device)
    if sharded and amp is torch.float16:
        # shards differ per rank: found-inf must be all-reduced or ranks step differently
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler: torch.amp.GradScaler = ShardedGradScaler(dist.device.type)
    else:
        scaler = torch.amp.GradScaler(dist.device.type, enabled=amp is torch.float16)
    lr = scaled_lr(
        o["base_lr"], o["batch_size"] * o["accum_steps"] * dist.world_size, o["lr_ref_batch"]
    )
    # every rank: the first to take the index's lock compiles it, the others map the file
    dataset = build_dataset(cfg["data"], index=index_path(cfg["data"], out))
    state = TrainState(
        cfg=cfg,
        out_dir=out,
        dist=dist,
        model=model,
        wrapped=model,
        optimizer=optimizer,
        scaler=scaler,
        schedules=Schedules.from_config(cfg, lr=lr),
        dataset=dataset,
        augment=MultiCropAugment.from_config(cfg["crops"]),
        amp_dtype=amp,
    )
    if ckpt is not None:
        _load_optimizer(state, ckpt)
        scaler.load_state_dict(ckpt["scaler"])
        state.step = int(ckpt["step"])
        state.last_checkpoint = out / CHECKPOINT_NAME
        if int(ckpt.get("world_size", 1)) == dist.world_size:
            set_rng_state(ckpt["rng"][dist.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        log.info("resumed from %s at step %d", out / CHECKPOINT_NAME, state.step)
    else:
        torch.manual_seed(int(cfg["seed"]) + dist.rank)  # per-rank drop-path noise
    if dist.enabled and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        state.wrapped = DDP(model, device_ids=ids, broadcast_buffers=False)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", dump_config(cfg))
    log.info(
        "student %s (%.1fM params), %d experts, %d tiles, global batch %d, lr %.2e",
        cfg["student"]["arch"],
        sum(p.numel() for p in model.student.parameters()) / 1e6,
        len(experts),
        len(dataset),
        state.global_batch,
        lr,
    )
    return state


def _load_optimizer(state: TrainState, ckpt: dict[str, Any]) -> None:
    """Restore the optimiser from a checkpoint written by a plain/DDP run (parameter ids) or
    by an FSDP run (full state keyed by parameter names)."""
    by_names = ckpt.get("optimizer_format") == "names"
    if by_names:
        load_sharded_optimizer(state.model, state.optimizer, ckpt["optimizer"])
    elif state.sharded:
        raise ConfigError(
            "--resume with train.strategy fsdp needs a checkpoint written by an FSDP run; "
            "this one comes from a single-process or DDP run: resume it with strategy ddp"
        )
    else:
        state.optimizer.load_state_dict(ckpt["optimizer"])


def batches(state: TrainState, start_micro: int) -> Iterator[dict[str, Any]]:
    """Micro-batches from micro-step ``start_micro`` on, built by ``data.num_workers`` worker
    processes (0: in this process); each batch's unreadable-tile count is added to
    ``state.tiles_skipped`` when the batch is taken. Close the generator to stop the workers."""
    c, o = state.cfg, state.cfg["optim"]
    kw = {
        "seed": int(c["seed"]),
        "batch_size": o["batch_size"],
        "rank": state.dist.rank,
        "world_size": state.dist.world_size,
        "patch_size": state.model.backbone.patch_size,
        "mask_probability": c["ibot"]["mask_sample_probability"],
        "mask_ratio": tuple(c["ibot"]["mask_ratio_min_max"]),
    }
    loader = make_loader(
        MicroBatches(state.dataset, state.augment, **kw),
        start=start_micro,
        num_workers=int(c["data"]["num_workers"]),
        seed=int(c["seed"]),
        pin_memory=state.dist.device.type == "cuda",
    )
    it = iterate(loader)
    try:
        for batch in it:
            state.tiles_skipped += int(batch.pop("skipped", 0))
            yield batch
    finally:
        it.close()


def _check_finite(state: TrainState, name: str, value: float, terms: dict[str, float]) -> None:
    if math.isfinite(value):
        return
    bad = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    kept = (
        f"last good checkpoint {state.last_checkpoint} kept"
        if state.last_checkpoint
        else "no checkpoint written yet"
    )
    raise TrainingDivergedError(
        f"{name} is not finite at step {state.step + 1} ({bad}); {kept}: lower optim.base_lr or raise optim.warmup_steps, then --resume"
    )


def _norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm of ``params`` (clipped to ``max_norm`` when given), as a plain tensor."""
    if max_norm is None:
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor norm over the shards
        norm = norm.full_tensor()
    return norm


def clip_gradients(
    student: nn.ModuleDict, clip: float, *, mode: str = "per_module"
) -> dict[str, torch.Tensor]:
    """Clip the student's gradients; returns each group's norm before clipping.

    Parameters
    ----------
    student : ModuleDict
        ``backbone``, ``dino_head`` (``ibot_head``), ``expert_heads``.
    clip : float
        Largest gradient norm; 0 disables clipping (norms are still measured).
    mode : {"per_module", "joint"}
        ``per_module``: the backbone and each DINO/iBOT head are clipped to ``clip`` each and
        the expert heads are not clipped (GPFM: ``train/train.py`` clips every module of
        ``model.student``, which does not hold the distillation heads). ``joint``: one norm over
        every student parameter, expert heads included.

    Returns
    -------
    dict of str to scalar Tensor
        ``{"all": norm}`` (joint) or one norm per module (per_module).
    """
    groups = {
        name: [p for p in module.parameters() if p.grad is not None]
        for name, module in student.items()
    }
    limit = clip if clip else None
    if mode == "joint":
        params = [p for ps in groups.values() for p in ps]
        return {"all": _norm(params, limit if limit else float("inf"))} if params else {}
    if mode != "per_module":
        raise ValueError(f"clip mode must be per_module or joint, got {mode!r}")
    return {
        name: _norm(params, None if name == "expert_heads" else limit)
        for name, params in groups.items()
        if params
    }


def train_step(state: TrainState, data: Iterator[dict[str, Any]]) -> dict[str, float]:
    """One optimiser step (``accum_steps`` micro-batches), EMA update; returns logged values."""
    cfg = state.cfg
    accum = int(cfg["optim"]["accum_steps"])
    values = state.schedules.at(state.step)
    apply_schedules(state.optimizer, values)
    state.model.train()
    sums: dict[str, float] = {}
    state.optimizer.zero_grad(set_to_none=True)
    dev = state.dist.device
    for a in range(accum):
        batch = {
            k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in next(data).items()
        }
        # DDP skips the gradient all-reduce on all but the last micro-batch; FSDP reduces
        # every micro-batch (correct, more traffic)
        sync = (
            contextlib.nullcontext()
            if (a == accum - 1 or not state.dist.enabled or state.sharded)
            else state.wrapped.no_sync()
        )
        with sync:
            with torch.autocast(
                dev.type,
                dtype=state.amp_dtype or torch.float32,
                enabled=state.amp_dtype is not None,
            ):
                losses = state.wrapped(batch, teacher_temp=values["teacher_temp"])
            if cfg["debug"]["nan_at_step"] is not None and state.step + 1 == int(
                cfg["debug"]["nan_at_step"]
            ):
                losses["total"] = losses["total"] * float("nan")
            terms = {k: float(v.detach()) for k, v in losses.items()}
            _check_finite(state, "the loss", terms["total"], terms)
            state.scaler.scale(losses["total"] / accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v / accum
    state.scaler.unscale_(state.optimizer)
    norms = clip_gradients(
        state.model.student, cfg["optim"]["clip_grad"], mode=cfg["optim"]["clip_grad_mode"]
    )
    # logged: the norm of every student gradient before clipping (whatever the mode)
    per_group = [float(n) for n in norms.values()]
    norm = per_group[0] if len(per_group) == 1 else math.sqrt(sum(v * v for v in per_group))
    if not state.scaler.is_enabled():  # fp16: an overflow skips the step and lowers the scale
        _check_finite(state, "the gradient norm", norm, sums)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.sharded:
        reshard(state.model)
    state.model.update_teacher(values["momentum"])
    state.step += 1
    return {
        **sums,
        **{k: values[k] for k in ("lr", "wd", "momentum", "teacher_temp")},
        "grad_norm": float(norm),
    }


def save(state: TrainState) -> Path | None:
    """Atomically write ``checkpoint.pt`` (rank 0; RNG states of every rank are gathered)."""
    rng = get_rng_state()
    if state.dist.enabled:
        import torch.distributed as tdist

        gathered: list[Any] = [None] * state.dist.world_size
        tdist.all_gather_object(gathered, rng)
        rng_all: Any = gathered
    else:
        rng_all = rng
    if state.sharded:  # a collective: every rank takes part, rank 0 receives the full state
        model_sd, optim_sd = full_state_dicts(state.model, state.optimizer)
        optim_format = "names"
    else:
        model_sd, optim_sd = state.model.state_dict(), state.optimizer.state_dict()
        optim_format = "ids"
    path = None
    if state.dist.is_main:
        payload = {
            "model": model_sd,
            "optimizer": optim_sd,
            "optimizer_format": optim_format,
            "scaler": state.scaler.state_dict(),
            "step": state.step,
            "world_size": state.dist.world_size,
            "rng": rng_all,
            "config": dump_config(state.cfg),
        }
        path = save_checkpoint(state.checkpoint_path, payload)
        state.last_checkpoint = path
    return path


def log_columns(state: TrainState) -> list[str]:
    """CSV columns: step, every loss term, total, schedules, grad norm, throughput."""
    names = list(state.model.loss_weights())
    return [
        "step",
        *names,
        "total",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "grad_norm",
        "tiles_per_s",
        "tiles_skipped",
    ]


def train(
    cfg: dict[str, Any], out_dir: str | os.PathLike[str], *, resume: bool = False
) -> TrainState:
    """Run (or continue) training until ``optim.total_steps``, ``train.stop_after`` more steps or
    step ``train.stop_at_step``, whichever comes first.

    Raises
    ------
    TrainingDivergedError
        A loss or gradient became NaN/inf (the last good checkpoint is kept).
    CheckpointError
        A checkpoint could not be written (the previous one is intact).
    """
    state = build(cfg, out_dir, resume=resume)
    t = cfg["train"]
    end = cfg["optim"]["total_steps"]
    if t["stop_after"] is not None:
        end = min(end, state.step + int(t["stop_after"]))
    if t["stop_at_step"] is not None:
        end = min(end, int(t["stop_at_step"]))
    resume_step = state.step if resume else None
    main = state.dist.is_main
    logger = (
        MetricsLogger(state.out_dir, log_columns(state), resume_step=resume_step) if main else None
    )
    every_eval = int(cfg["eval"]["every"])
    eval_set = eval_logger = None
    if every_eval:
        eval_set = build_eval_set(cfg, index=index_path(cfg["data"], state.out_dir))
        if main:
            eval_logger = MetricsLogger(
                state.out_dir,
                EVAL_COLUMNS,
                resume_step=resume_step,
                name="eval.csv",
                tb_prefix="eval/",
            )
    every_snapshot = int(t["snapshot_every"])
    data = batches(state, state.step * cfg["optim"]["accum_steps"])
    try:
        while state.step < end:
            t0 = time.perf_counter()
            values = train_step(state, data)
            values["tiles_per_s"] = state.global_batch / max(time.perf_counter() - t0, 1e-9)
            if state.step % t["log_every"] == 0 or state.step == end:
                _log_step(state, values, logger)
            if every_snapshot and state.step % every_snapshot == 0:
                save_snapshot(
                    state.out_dir,
                    state.model,
                    step=state.step,
                    config=dump_config(cfg),
                    sharded=state.sharded,
                    is_main=main,
                )
            if eval_set is not None and state.step % every_eval == 0:
                _evaluate(state, eval_set, eval_logger)
            if state.step % t["checkpoint_every"] == 0 or state.step == end:
                save(state)
    finally:
        data.close()  # stops the loader's worker processes
        for lg in (logger, eval_logger):
            if lg is not None:
                lg.close()
        state.dataset.close()
    return state


def _log_step(state: TrainState, values: dict[str, Any], logger: MetricsLogger | None) -> None:
    """Log one step: loss terms and gradient norm averaged over ranks, skipped tiles summed
    (a collective: every rank calls it at the same steps; rank 0 writes)."""
    values["tiles_skipped"] = state.tiles_skipped
    state.tiles_skipped = 0
    mean = [*state.model.loss_weights(), "total", "grad_norm"]
    values = reduce_across_ranks(values, mean=mean, total=["tiles_skipped"])
    if logger is None:
        return
    logger.log({"step": state.step, **values})
    log.info(
        "step %d total %.4f lr %.2e %.1f tiles/s%s",
        state.step,
        values["total"],
        values["lr"],
        values["tiles_per_s"],
        f", {values['tiles_skipped']} unreadable tiles replaced" if values["tiles_skipped"] else "",
    )


def _evaluate(state: TrainState, eval_set: Any, logger: MetricsLogger | None) -> None:
    """kNN and linear probe of the teacher's features on the evaluation set; rank 0 logs."""
    res = evaluate(
        state.model, eval_set, state.cfg, amp_dtype=state.amp_dtype, main=state.dist.is_main
    )
    if state.sharded:
        reshard(state.model)  # the teacher's root units stay gathered after a forward
    if res is None or logger is None:
        return
    logger.log({"step": state.step, **res})
    log.info(
        "eval step %d (%s, %d tiles): kNN %.3f, linear %.3f",
        state.step,
        eval_set.task,
        res["n_tiles"],
        res["knn_acc"],
        res["linear_acc"],
    )
