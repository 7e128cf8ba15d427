"""Small pieces every study shares: device choice, autocast, derived seeds, progress, timing,
threads. The processes torchrun started are distributed.py's.

No MLflow, no Typer, no printing: the algorithm modules import this.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from .distributed import local_rank

T = TypeVar("T")
R = TypeVar("R")

# A progress reporter wraps an iterable and yields its items: `progress(items, total, desc)`.
# The CLI passes one that draws a bar; a library caller passes nothing.
Progress = Callable[[Iterable[T], int, str], Iterable[T]]


def no_progress(items: Iterable[T], total: int, desc: str) -> Iterable[T]:
    return items


# Values per forward pass below which one intra-op thread is about as fast as several on a quiet
# machine and faster beside other work (measured on 2 cores, benchmarks/threads.py): training at
# 8,192 (the digits' batches of 128), PGD at 32,768 and the trigger search at 81,920 gain at most
# 8% from a second thread alone and run 8% (PGD) to 3.8x (training) slower with it beside a
# second twml; certification at 128,000 runs 1.9x faster with two, as two batches at once
# (forward_pool).
SMALL_WORK = 100_000


def choose_threads(explicit: int = 0, work: int | None = None) -> tuple[int, str]:
    """(intra-op threads for this process, why). `explicit` (--threads) wins, then
    OMP_NUM_THREADS. Else `work`, the values through the model in one forward pass (batch x
    channels x height x width): below SMALL_WORK the threads would mostly wait for each other
    (and, beside other work, spin), so one thread; otherwise the cores this process may run on
    (its CPU affinity) shared among the processes torchrun started on this machine. A function
    of the work, the machine and the launch, never of the momentary load, so the same command on
    the same machine repeats its numbers (a CPU's numbers depend on the thread count)."""
    import os

    if explicit > 0:
        return explicit, "--threads"
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given), "OMP_NUM_THREADS"
    if work is not None and work < SMALL_WORK:
        return 1, f"{work:,} values per forward pass (under {SMALL_WORK:,})"
    cores, procs = machine_cores()
    return max(1, cores // procs), f"{cores} cores / {procs} process{'es' if procs > 1 else ''}"


def machine_cores() -> tuple[int, int]:
    """(the cores this process may run on (its CPU affinity), the processes torchrun started on
    this machine, which share them)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores, max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def apply_threads(choice: tuple[int, str]) -> int:
    """Set the intra-op threads chosen by choose_threads; returns them."""
    torch.set_num_threads(choice[0])
    return choice[0]


_PLAN: dict[str, int] = {}  # intra-op threads by phase while a study runs: "train" and "evaluate"


@contextlib.contextmanager
def planned_threads(train: int, evaluate: int) -> Iterator[None]:
    """Inside the block, phase("train") runs with `train` intra-op threads and phase("evaluate")
    with `evaluate`; the block starts with `train`. Outside it, phase() leaves the count alone (a
    library caller keeps its own)."""
    _PLAN.update(train=train, evaluate=evaluate)
    torch.set_num_threads(train)
    try:
        yield
    finally:
        _PLAN.clear()


@contextlib.contextmanager
def phase(kind: str) -> Iterator[None]:
    """Run the block with the intra-op threads planned for `kind`: "train" for steps that update
    weights (training, unlearning), "evaluate" for the rest (evaluation, attacks, certification,
    the trigger search); afterwards the count before. Training's numbers depend on the count (the
    order of its reductions); evaluation's did not in any digit on the digits model."""
    wanted, before = _PLAN.get(kind), torch.get_num_threads()
    if wanted is None or wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def forward_pool(fn: Callable[[T], R], items: Iterable[T], device: torch.device, parallel: bool = True) -> Iterator[R]:
    """fn(item) for every item, in order. On a CPU running T > 1 intra-op threads (and when
    `parallel`), T items at a time, each on a Python thread of its own with one intra-op thread:
    independent forward passes keep T cores busy without meeting at every layer, so they run
    faster than one pass split T ways (certification on 2 cores: 1.9x one thread's speed against
    1.2x), lose only their share of the cores beside other work, and give each item's 1-thread
    result whatever T is. fn sets its own thread-local modes (inference_mode, autocast).
    Elsewhere (CUDA, one thread, or not `parallel`: a compiled model) one item after another."""
    workers = torch.get_num_threads() if device.type == "cpu" and parallel else 1
    if workers <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="twml-forward") as pool:
            try:
                for item in items:
                    pending.append(pool.submit(fn, item))
                    if len(pending) > 2 * workers:  # a bounded queue: items may be large (noisy batches)
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # an error or Ctrl-C: what has not started is dropped, not waited for
                for future in pending:
                    future.cancel()
    finally:
        torch.set_num_threads(workers)


class _Stopped(Exception):
    """An item of side_by_side stopped because the calling thread stopped (an error or Ctrl-C)."""


def side_by_side(
    fn: Callable[[T, Progress], R], items: list[T], workers: int, progress: Progress, total: int, desc: str
) -> list[R]:
    """[fn(item, progress) for item in items], in order. With workers > 1, that many items at a
    time, each on a Python thread of its own, for work that runs on one intra-op thread: each
    item then gives the numbers it gives alone. Their loops (the iterables fn passes to its
    progress) advance one bar, progress(..., total, desc), drawn from the calling thread; an
    error in one item, or Ctrl-C, stops the others at their next step."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item, progress) for item in items]
    ticks: queue.SimpleQueue[None] = queue.SimpleQueue()
    stop = threading.Event()

    def counted(steps: Iterable, _total: int, _desc: str) -> Iterable:
        for step in steps:
            if stop.is_set():
                raise _Stopped
            yield step
            ticks.put(None)

    with ThreadPoolExecutor(workers, thread_name_prefix="twml-side") as pool:
        futures = [pool.submit(fn, item, counted) for item in items]

        def ticking() -> Iterator[None]:
            while not any(f.done() and f.exception() is not None for f in futures):  # one failed: stop
                try:
                    yield ticks.get(timeout=0.1)
                except queue.Empty:
                    if all(f.done() for f in futures):
                        return

        try:
            for _ in progress(ticking(), total, desc):
                pass
        finally:  # an item that failed, or Ctrl-C here: the rest stop at their next step
            stop.set()
    errors = [f.exception() for f in futures]
    failed = next((e for e in errors if e is not None and not isinstance(e, _Stopped)), None)
    if failed is not None:
        raise failed
    return [f.result() for f in futures]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available (this process's GPU under torchrun), else cpu. Raises
    ValueError for anything else."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' asked for, but no CUDA device is available (use --device cpu or auto)")
        return torch.device(name)
    raise ValueError(f"unknown device '{name}': use auto, cpu or cuda")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs in float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device_layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch of images to the device, channels_last (faster convolutions on GPUs and,
    measured here, on CPUs too: 1.2x training and 1.3x inference for the digits model)."""
    x = x.to(device, non_blocking=True)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys, e.g. (seed, example index, phase, block).

    Randomness keyed this way does not depend on batch size, packing or how the data
    is split across processes: the same keys give the same stream everywhere.
    """
    digest = hashlib.blake2b(b",".join(str(int(k)).encode() for k in keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(device: torch.device, *keys: int) -> torch.Generator:
    """A torch.Generator on `device` seeded by derive_seed(*keys)."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block the model's parameters require no grad (attacks and trigger search
    need only the input's gradient); afterwards those that did require it again."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def no_autotune() -> Iterator[None]:
    """cuDNN autotuning off inside the block (for work whose batch shape keeps changing)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of a block, with the device's queued work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start

    def elapsed(self) -> float:
        """Seconds so far, inside the block."""
        synchronize(self.device)
        return time.perf_counter() - self._start


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering range(n)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


# ---------------------------------------------------------------- keyed randomness without loops


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds), on int64 tensors holding values
    below 2**32; every product stays below 2**63, so nothing overflows on any device."""
    mask = 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & mask
    x = ((x >> 16) ^ x) * 0x45D9F3B & mask
    return (x >> 16) ^ x


def keyed_uniform(ids: torch.Tensor, shape: tuple[int, ...], *keys: int) -> torch.Tensor:
    """Uniform [0, 1) numbers of shape (len(ids), *shape): row i depends only on (keys, ids[i])
    and the element's position, never on the batch it is drawn in. Vectorized (a counter-based
    hash, no Python loop), on ids' device, so per-example randomness (PGD's random starts,
    augmentation) is the same whatever the batching or the number of processes."""
    seed = derive_seed(*keys)
    base = _mix32(_mix32(ids.long() & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF)) ^ ((seed >> 32) & 0xFFFFFFFF)
    count = int(torch.tensor(shape).prod()) if shape else 1
    counter = torch.arange(count, device=ids.device, dtype=torch.long)
    bits = _mix32(_mix32(base[:, None] ^ _mix32(counter[None, :] + 0x9E3779B9 & 0xFFFFFFFF)))
    return ((bits >> 8).float() * (1.0 / (1 << 24))).view(len(ids), *shape)
