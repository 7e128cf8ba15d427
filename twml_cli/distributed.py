"""The processes torchrun started: which one this is, its share of the work, and the collectives
that put the shares together. Every function is a no-op (or the identity) in one process, so the
algorithms call them unconditionally.

No MLflow, no Typer, no printing: the algorithm modules import this.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def active() -> bool:
    """Whether this process belongs to an initialized process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched() -> bool:
    """Whether torchrun (or twml --nproc-per-node) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def init() -> None:
    """Join the process group torchrun set up: NCCL on CUDA, gloo on CPU. A no-op in one process."""
    if not launched() or active():
        return
    # torch._dynamo (imported by timm and torch.compile) imported after the group exists keeps
    # references to it that destroy_process_group cannot drop: the group's gloo threads then live
    # on into interpreter exit, which now and then ends a finished process with std::terminate.
    # Imported first, it holds none.
    import torch._dynamo  # noqa: F401

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        torch.distributed.init_process_group("nccl")
    else:
        torch.distributed.init_process_group("gloo")


def close() -> None:
    """Leave the process group before the interpreter exits: a gloo group still alive at exit
    can end the process with std::terminate ("terminate called without an active exception")
    after its work is done (pytorch/pytorch#190489; see also init). A no-op in one
    process."""
    if active():
        torch.distributed.destroy_process_group()


def shard(n: int, part: int | None = None, parts: int | None = None) -> slice:
    """The contiguous share of range(n) that process `part` of `parts` handles (default: this
    one of the world): sizes differ by at most one, earlier parts take the remainder."""
    part, parts = (rank() if part is None else part), (world_size() if parts is None else parts)
    size, extra = divmod(n, parts)
    start = part * size + min(part, extra)
    return slice(start, start + size + (part < extra))


def collective_device() -> torch.device:
    """Where tensors must be for collectives: the GPU under NCCL, else the CPU."""
    if active() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place); the tensor itself in one process."""
    if active():
        torch.distributed.all_reduce(t)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows, concatenated in rank order (rows may differ in number)."""
    if not active():
        return t
    sizes = [torch.zeros((), dtype=torch.long, device=t.device) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, torch.tensor(len(t), device=t.device))
    top = int(max(sizes))
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])


def broadcast_text(text: str | None, length: int = 64) -> str:
    """Rank 0's string (e.g. a run id, at most `length` ASCII characters) on every process."""
    if not active():
        return text or ""
    data = torch.zeros(length, dtype=torch.uint8)
    if rank() == 0 and text:
        raw = text.encode("ascii")[:length]
        data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    torch.distributed.broadcast(data, 0)
    return bytes(data.tolist()).rstrip(b"\0").decode("ascii")


def barrier() -> None:
    if active():
        torch.distributed.barrier()
