"""Data-parallel training under torchrun: who am I, and the few collectives the loop needs.

`torchrun --nproc_per_node N` sets RANK, WORLD_SIZE and LOCAL_RANK; without them
the run is a single process and every helper here is a no-op. gloo serves CPU
runs, nccl GPU runs. Rank 0 alone writes the run directory and the checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stablediff.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun): {exc}") from None


def init(info: DistInfo, device: torch.device) -> None:
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Long timeout: rank 0 may train the VAE and fill the feature cache while the others wait.
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timedelta(hours=2))


def shutdown(synchronize: bool = False) -> None:
    """Leave the process group. `synchronize` (the normal end of a run) first waits for every rank: a
    rank that destroys its gloo group while another still works can abort the process (SIGABRT,
    "terminate called without an active exception"). After an error the ranks do not wait for each
    other: a rank that failed would never arrive, and torchrun stops the rest."""
    if not dist.is_initialized():
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flags: list[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks, so every rank takes the same decision."""
    if not dist.is_initialized():
        return flags
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def mean_over_ranks(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).tolist()


def gather_to_all(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (a single-element list without torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: object) -> object:
    """Rank 0's `obj` on every rank (itself without torchrun): a decision that only rank 0 can compute,
    such as the validation loss that early stopping judges, is then taken alike by every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
