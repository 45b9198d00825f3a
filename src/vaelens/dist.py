"""torchrun / DistributedDataParallel set-up and rank helpers.

Under torchrun (WORLD_SIZE > 1 in the environment) `setup()` joins the process group:
gloo on CPU, NCCL on CUDA. Outside torchrun everything here is a no-op for rank 0 of 1.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank and world size as torchrun sets them (rank 0 of 1 when not under torchrun)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun; return this process's rank info."""
    info = env_info()
    if info.distributed and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart == "0":
            tdist.init_process_group(backend=backend)
        else:
            # After torchrun restarted the workers (--max-restarts), the store still holds the addresses the
            # killed attempt's ranks published; a rank that read one of those would wait on a dead peer
            # ("Gloo connectFullMesh failed ... Connection refused", seen with static and c10d rendezvous).
            # Each attempt's keys under a prefix of their own keep the attempts apart.
            store, rank, world = next(tdist.rendezvous("env://"))
            tdist.init_process_group(backend=backend, store=tdist.PrefixStore(f"vaelens-attempt-{restart}", store),
                                     rank=rank, world_size=world)
    return info


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def _several() -> bool:
    """Whether this process is one of several ranks of a joined process group."""
    return tdist.is_initialized() and tdist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity outside torchrun)."""
    if _several():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_max_int(v: int, device: torch.device) -> int:
    """The largest of every rank's `v` (v itself outside torchrun)."""
    if _several():
        t = torch.tensor([v], dtype=torch.int64, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())
    return v


def agreed_signal(name: Optional[str], device: torch.device) -> Optional[str]:
    """The name of the signal that asks the run to stop, the same on every rank; None to go on.

    `name` is the signal this rank has seen, if any. Under torchrun each rank sees its signal between
    different steps (or only one rank gets it); a rank that stopped alone would leave the others waiting
    in the next gradient all-reduce. So the ranks agree, at every check, on the highest signal number any
    of them has seen.
    """
    num = all_reduce_max_int(0 if name is None else int(signal.Signals[name]), device)
    return None if num == 0 else signal.Signals(num).name


def all_gather_tensor(t: torch.Tensor, device: torch.device) -> list:
    """Every rank's `t` (same shape and dtype on each), on the CPU in rank order ([t] outside torchrun).

    Plain tensors rather than pickled objects: nothing a rank receives is unpickled.
    """
    if _several():
        mine = t.to(device)  # NCCL gathers only tensors on the GPU
        parts = [torch.empty_like(mine) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, mine)
        return [q.cpu() for q in parts]
    return [t]


def gather_rng_states(device: torch.device) -> dict:
    """Every rank's generator states (CPU, and CUDA on a GPU) as checkpoint tensors, gathered from all ranks.

    A step's noise comes from the device's generator and differs between ranks, so a mid-epoch
    checkpoint keeps each rank's: the resumed ranks then draw what the uninterrupted ones would have.
    Rank 0's CPU state is the checkpoint's ``rng.torch``; the others are ``rng.<kind>.rank<r>``.
    """
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, t in mine.items():
        for r, state in enumerate(all_gather_tensor(t, device)):
            if (r, kind) != (0, "torch"):
                out[f"rng.{kind}.rank{r}"] = state
    return out


def barrier() -> None:
    if _several():
        tdist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if _several():
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def shard_range(n: int) -> tuple:
    """This rank's contiguous share [start, stop) of n rows; shares differ in size by at most one."""
    if _several():
        r, w = tdist.get_rank(), tdist.get_world_size()
        return n * r // w, n * (r + 1) // w
    return 0, n


def gather_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's `shard_range(n)` rows of t in rank order: all n rows, each once.

    all_gather needs equal shapes, so each share is padded to the largest and the padding dropped.
    """
    if not _several():
        return t
    w = tdist.get_world_size()
    sizes = [n * (r + 1) // w - n * r // w for r in range(w)]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(w)]
    tdist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])
