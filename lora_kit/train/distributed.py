"""Data-parallel plumbing: process groups, DDP/FSDP2 wrapping, full-parameter gathering.

The trainer calls the model through whatever wrapper is in force (none, DDP, FSDP2
``fully_shard`` or a user's FSDP1 ``FullyShardedDataParallel``) and reaches the `LoraModel`
underneath with :func:`unwrap`. Saving happens inside :func:`full_params`, where every rank
gathers the sharded tensors so the adapter written (by rank 0) is complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError, LoraKitError
from ..model import LoraModel


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank (0 when not distributed).
        world_size: Number of processes.
        device: The device this process computes on.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the ``torchrun`` process group if there is one (gloo on CPU, nccl on CUDA).

    Args:
        device: ``"cpu"``/``"cuda"``; default CUDA when available.

    Returns:
        The context; a single-process one when ``WORLD_SIZE`` is unset or 1.
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return DistContext(rank, world, torch.device("cuda", local))
    return DistContext(rank, world, torch.device(kind))


def unwrap(model: nn.Module) -> LoraModel:
    """The `LoraModel` inside DDP/FSDP1 wrappers (FSDP2 shards in place, so it is the model).

    Raises:
        LoraKitError: No `LoraModel` found.
    """
    inner: nn.Module = model
    while isinstance(inner, DistributedDataParallel | FullyShardedDataParallel):
        inner = inner.module
    if not isinstance(inner, LoraModel):
        raise LoraKitError(
            f"expected a LoraModel (optionally wrapped in DDP/FSDP), got {type(inner).__name__}; "
            f"create one with lora_kit.inject(model, config)"
        )
    return inner


def is_fsdp1(model: nn.Module) -> bool:
    """Whether ``model`` is (wrapped in) an FSDP1 ``FullyShardedDataParallel``."""
    return isinstance(model, FullyShardedDataParallel)


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` or any of its modules is sharded with FSDP2 ``fully_shard``."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def wrap(lm: LoraModel, strategy: str, ctx: DistContext) -> nn.Module:
    """Wrap ``lm`` for ``strategy`` (``none``, ``ddp`` or ``fsdp``); a no-op on one process.

    FSDP2 shards each repeated block (the elements of the model's ``nn.ModuleList``\\ s) and
    then the root, so frozen base weights and fp32 adapters share each block's group.

    Raises:
        ConfigError: An unknown strategy.
    """
    if strategy not in ("none", "ddp", "fsdp"):
        raise ConfigError(f"strategy must be none, ddp or fsdp, got {strategy!r}")
    if strategy == "none" or not ctx.distributed:
        return lm
    if strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(lm, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in _blocks(lm):
        fully_shard(block, mesh=mesh)
    fully_shard(lm, mesh=mesh)
    return lm


def _blocks(lm: LoraModel) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for module in lm.model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and not isinstance(module[0], nn.ModuleList | nn.ModuleDict):
                blocks.extend(module)
    return blocks


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[None]:
    """Inside the block every parameter is whole on every rank (collective: all ranks enter).

    FSDP1: ``summon_full_params``; FSDP2: ``unshard``/``reshard`` of every sharded module;
    otherwise nothing to do.
    """
    if is_fsdp1(model):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
        return
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()


def grad_norm(model: nn.Module, params: Sequence[nn.Parameter], max_norm: float) -> float:
    """Clip gradients to ``max_norm`` (0: no clipping) and return the global pre-clip norm."""
    limit = max_norm if max_norm > 0 else float("inf")
    if is_fsdp1(model):
        norm: Any = cast(FullyShardedDataParallel, model).clip_grad_norm_(limit)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def all_reduce_sum(values: Tensor, ctx: DistContext) -> Tensor:
    """Sum ``values`` over all ranks (identity on one process), on ``values``' device.

    The collective runs on ``ctx.device``: NCCL, the process group on CUDA, reduces only CUDA
    tensors, and the trainer's counts and losses are gathered on the CPU.
    """
    if ctx.distributed:
        summed = values.to(ctx.device, copy=True)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(values.device)
    return values


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op on one process)."""
    if ctx.distributed:
        dist.barrier()
