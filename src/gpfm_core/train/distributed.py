"""torchrun set-up (process group from the environment: gloo on CPU, NCCL on CUDA) and the two
data-parallel strategies: DDP (replicated model) and FSDP (``fully_shard``, sharded model)."""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "full_state_dicts",
    "init_distributed",
    "load_sharded_optimizer",
    "reshard",
    "shard_model",
    "shutdown_distributed",
]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and the device of this process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_train_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` if available else CPU; ``cuda`` -> ``cuda:<local_rank>``."""
    from gpfm_core.errors import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} but CUDA is not available: set device: cpu (or auto)")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_train_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        log.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown_distributed(*, wait: bool = True) -> None:
    """Leave the process group if one was joined.

    Without the barrier, a finished two-rank gloo run aborted at exit in 4–8 of 40 runs here
    ("terminate called without an active exception", SIGABRT after the script's last line);
    with the barrier and the garbage collection after it, in 0 of 40 (twice). The barrier
    without the collection still let 3 of 40 abort, and dropping the DDP models without the
    barrier 2–4 of 40. ``benchmarks/check_gloo_exit.py`` measures it; figures in
    BENCHMARKS.md.

    Parameters
    ----------
    wait : bool
        First wait for every rank (a barrier), so that no rank destroys the group while
        another still uses it. A collective: pass ``False`` after an error, when other ranks
        may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    gc.collect()  # measured: without it the barrier alone still let 3 of 40 runs abort
    dist.destroy_process_group()


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: shard the student and the EMA teacher, one unit per transformer block.

    ``model`` is a :class:`~gpfm_core.train.meta_arch.UnifiedDistillation`. Student and teacher
    are sharded the same way, so the EMA update works shard by shard; the frozen experts and
    the loss modules (centres, target statistics) stay replicated. Build the optimiser after
    this call: sharding replaces the parameters.
    """
    from torch.distributed.fsdp import fully_shard

    trees = [model.student]
    if hasattr(model, "teacher"):
        trees.append(model.teacher)
    for tree in trees:  # ModuleDicts have no forward: shard what they hold
        for block in tree["backbone"].model.blocks:
            fully_shard(block)
        for name, module in tree.items():
            heads = module.values() if name == "expert_heads" else [module]
            for head in heads:
                fully_shard(head)


def reshard(model: torch.nn.Module) -> None:
    """Return every FSDP unit of ``model`` to its sharded parameters.

    FSDP keeps a root unit's parameters gathered after its forward (backward would gather
    them again at once); the teacher has no backward, so its roots stay gathered until this
    call. The EMA update needs student and teacher both sharded, shard for shard.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimiser state dicts on rank 0's CPU (a collective: call on all
    ranks; other ranks get empty dicts). Keys are the unsharded model's own names, so the
    checkpoint loads, exports and resumes like a DDP one."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=opts),
        get_optimizer_state_dict(model, optimizer, options=opts),
    )


def load_sharded_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load a full (unsharded, parameter-name keyed) optimiser state into a sharded run."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
