"""Process-group set-up and collectives for DistributedDataParallel training.

``torchrun --nproc_per_node N [--nnodes M ...] -m open_fastervit.cli train ...`` sets the usual environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); ``init_distributed`` then joins the
group through timm (NCCL on CUDA, gloo on CPU) and pins each process to its local GPU. Without those
variables everything here is a no-op on a single process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.utils import distribute_bn
from timm.utils.distributed import init_distributed_device_so, is_distributed_env
from torch import nn

from ..runtime import default_device

__all__ = ["DistInfo", "average_bn_stats", "cleanup", "init_distributed", "rank_divergence", "reduce_sums"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: device, world size, global and local rank."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the only process that prints, logs and writes files."""
        return self.rank == 0


def init_distributed(device: str | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group described by the environment (torchrun / SLURM), or run single-process."""
    device = device or str(default_device())
    if is_distributed_env() and not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    info = init_distributed_device_so(device=device, dist_backend=backend)
    return DistInfo(torch.device(info["device"]), info["world_size"], info["global_rank"], info["local_rank"])


def cleanup(info: DistInfo, barrier: bool = True) -> None:
    """Leave the process group (after a final barrier unless a rank is failing)."""
    if info.distributed and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def reduce_sums(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; identity on one process)."""
    if not info.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def average_bn_stats(model: nn.Module, info: DistInfo) -> None:
    """Average BatchNorm running statistics over ranks (timm ``distribute_bn``), so every rank agrees."""
    if info.distributed:
        distribute_bn(model, info.world_size, reduce=True)


def rank_divergence(model: nn.Module, info: DistInfo) -> float:
    """Largest difference between ranks of any parameter's checksum (0.0 when in sync or single-process).

    Each rank computes (sum, sum of squares) per parameter in float64; max - min over ranks is gathered.
    """
    if not info.distributed:
        return 0.0
    sums = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in model.parameters()]
    local = torch.cat(sums).to(info.device)
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).abs().max())
