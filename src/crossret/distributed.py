"""Data-parallel training under ``torchrun``: the process group and the few collectives the trainers use.

Everything here is a no-op (or the identity) when the process is not part of a process group with more
than one rank, so single-process code calls these helpers unconditionally and gives bit-for-bit the
same results as without them. See ``docs/distributed.md`` for what the trainers shard and what they
run on rank 0.

* :func:`process_group` joins the group that ``torchrun`` describes in the environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and leaves it afterwards;
  gloo for CPU tensors, nccl for CUDA tensors.
* :func:`shard_range` is the contiguous slice of a global batch that this rank computes.
* :func:`gather_with_grad` concatenates every rank's rows and sends each rank the summed gradient of
  its rows back: a loss computed on the gathered tensor is the single-process loss.
* :func:`average_gradients` averages ``.grad`` over ranks after ``backward``.
* :func:`run_on_main` runs a function on rank 0 only (file writes, graph building) and hands its
  result, or its exception, to every rank.
* :func:`global_batchnorm` makes the BatchNorm layers of a module normalise over the global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")

__all__ = [
    "GlobalBatchNorm",
    "active",
    "average_gradients",
    "barrier",
    "broadcast_module_",
    "broadcast_object",
    "gather_rows",
    "gather_with_grad",
    "global_batchnorm",
    "init_from_env",
    "is_main",
    "local_device",
    "local_rank",
    "process_group",
    "rank",
    "rank_rng",
    "row_counts",
    "run_on_main",
    "shard_range",
    "teardown",
    "world_size",
]


# ---------------------------------------------------------------------------------------------- group
def active() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 and in a single process: the rank that writes files and prints."""
    return rank() == 0


def local_rank() -> int:
    """Rank on this node (``LOCAL_RANK`` as torchrun sets it; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(device: str | torch.device) -> torch.device:
    """``cuda`` without an index becomes this rank's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", local_rank())
    return device


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    ``backend``: ``gloo`` (CPU tensors), ``nccl`` (CUDA tensors) or None (nccl when CUDA is available,
    else gloo). Returns True when this call created the group; False when a group already exists or
    the environment describes one process (``WORLD_SIZE`` unset or 1), which is then left alone.
    Collectives time out after ``CROSSRET_DIST_TIMEOUT`` seconds (default 7200): the other ranks wait
    in one while rank 0 builds COUPLE's graph or evaluates, which may take longer than torch's 30 minutes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for distributed training but this torch has no "
                           "torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())  # nccl collectives and object broadcasts use the current device
    timeout = datetime.timedelta(seconds=float(os.environ.get("CROSSRET_DIST_TIMEOUT", "7200")))
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    return True


def teardown() -> None:
    """Leave the process group (no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: str | None = None) -> Iterator[None]:
    """Run a block inside torchrun's process group: join it if the environment describes one and no
    group exists yet, and leave it afterwards if this call joined it (see :func:`init_from_env`)."""
    created = init_from_env(backend)
    try:
        yield
        if created:
            # Leave together: a gloo rank that tears its connections down while another still has
            # them open could abort at exit ("terminate called without an active exception").
            barrier()
    finally:
        if created:
            teardown()


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if active():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- objects
def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; numpy arrays and scipy matrices included)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; every rank returns its result, or raises its exception.

    In one process this is ``fn()``. Under torchrun the other ranks wait in the broadcast, so this is
    also a barrier, and an error on rank 0 (a bad path, a full disk) stops every rank instead of
    leaving them waiting forever.
    """
    if not active():
        return fn()
    payload: tuple[bool, Any] | None = None
    if is_main():
        try:
            payload = (True, fn())
        except BaseException as exc:  # every rank must learn of it, KeyboardInterrupt included
            payload = (False, exc)
            try:
                pickle.dumps(exc)
            except Exception:  # an exception that cannot travel: send its text
                payload = (False, RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}"))
            broadcast_object(payload)
            raise
    payload = broadcast_object(payload)
    assert payload is not None
    ok, value = payload
    if not ok:
        raise value
    return value


def broadcast_module_(module: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank, in place (as DDP does
    when it wraps a module), so that all ranks start from the same weights."""
    if active():
        with torch.no_grad():
            for tensor in module.state_dict(keep_vars=True).values():
                if isinstance(tensor, Tensor):
                    dist.broadcast(tensor.data, src=src)
    return module


# ---------------------------------------------------------------------------------------------- batches
def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``(lo, hi)``: the contiguous rows of an ``n``-row global batch that ``rank_`` computes.

    The first ``n % world`` ranks get one row more (``numpy.array_split``); concatenating the shards in
    rank order gives the global batch back, which is what :func:`gather_with_grad` relies on.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(int(n), world)
    lo = rank_ * base + min(rank_, extra)
    return lo, lo + base + (1 if rank_ < extra else 0)


def row_counts(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` (a collective; ``[n]`` outside a process group)."""
    if not active():
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def _all_gather_padded(t: Tensor, sizes: list[int]) -> Tensor:
    """Concatenation of every rank's ``t`` (``sizes[r]`` rows on rank r). all_gather needs equal shapes,
    so each rank pads to the largest shard and the padding is cut off again."""
    largest = max(sizes)
    if largest == 0:
        return t.new_zeros((0, *t.shape[1:]))
    t = t.contiguous()
    if t.shape[0] < largest:
        t = torch.cat([t, t.new_zeros((largest - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """Forward: the rows of all ranks, in rank order. Backward: the gradient of the whole gathered
    tensor summed over ranks (each rank's loss may use any row), cut to this rank's rows."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        return _all_gather_padded(t, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        sizes, me = ctx.sizes, rank()
        lo = sum(sizes[:me])
        if max(sizes) == 0:
            return grad.new_zeros((0, *grad.shape[1:])), None
        total = grad.contiguous().clone()  # never reduce into a buffer autograd may still hold
        dist.all_reduce(total)
        return total[lo:lo + sizes[me]], None


def gather_with_grad(t: Tensor, sizes: list[int] | None = None) -> Tensor:
    """``cat`` over ranks of ``t (n_r, ...)``, differentiable (shards may differ in size).

    The gradient that reaches rank r's ``t`` is the sum over ranks of the gradient of rows
    ``[Σ_{q<r} n_q, Σ_{q≤r} n_q)``. Every rank computes the same loss from the gathered tensor, so with
    :func:`average_gradients` afterwards the update is the single-process one. The identity outside a
    process group. ``sizes`` (from :func:`row_counts`) saves one collective when already known.
    """
    if not active():
        return t
    sizes = row_counts(t.shape[0], t.device) if sizes is None else sizes
    return _GatherWithGrad.apply(t, sizes)  # type: ignore[no-any-return]


@torch.no_grad()
def gather_rows(t: Tensor) -> Tensor:
    """``cat`` over ranks of ``t (n_r, ...)`` without gradient (the identity outside a process group)."""
    if not active():
        return t
    return _all_gather_padded(t.detach(), row_counts(t.shape[0], t.device))


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in place, in one flat all-reduce per dtype.

    A parameter keeps ``grad = None`` only if it has none on every rank (then the optimiser skips it,
    as in one process); one that has a gradient on some rank gets the average with zeros elsewhere.
    """
    if not active():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    chosen = [p for p, flag in zip(params, has.tolist(), strict=True) if flag > 0]
    world = world_size()
    for dtype in sorted({p.dtype for p in chosen}, key=str):
        group = [p for p in chosen if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in group:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


@contextlib.contextmanager
def rank_rng(*key: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block on torch's global generator (and ``device``'s, for CUDA) re-seeded from ``key`` and
    this rank, then restore the caller's generator state.

    Dropout in a sharded forward must draw different masks on different ranks, and it must not advance
    the generator that replicated computations (run identically on every rank) draw from, or the ranks
    would stop agreeing.
    """
    device = torch.device(device)
    seed = int(np.random.SeedSequence([*(int(k) for k in key), rank()]).generate_state(1, np.uint64)[0] >> 1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- batch norm
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer whose training-mode statistics are those of the global batch.

    Under torchrun each rank holds a shard of the batch; this layer gathers the shards (with gradient),
    normalises the global batch exactly as the single-process layer would (running statistics
    included, identical on every rank) and returns this rank's rows. It is CPU-capable, unlike
    ``torch.nn.SyncBatchNorm``. Outside a process group, or in eval mode, it is the plain layer.
    Installed by :func:`global_batchnorm` by switching the class of existing layers, so parameters,
    buffers and ``state_dict`` keys stay the same objects.
    """

    _plain: type[nn.modules.batchnorm._BatchNorm]

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and active()):
            return self._plain.forward(self, input)
        sizes = row_counts(input.shape[0], input.device)
        lo = sum(sizes[:rank()])
        full = gather_with_grad(input, sizes)
        return self._plain.forward(self, full)[lo:lo + input.shape[0]]


_GLOBAL_CLASSES: dict[type, type] = {}


def _global_class(plain: type) -> type:
    if plain not in _GLOBAL_CLASSES:
        _GLOBAL_CLASSES[plain] = type(f"Global{plain.__name__}", (GlobalBatchNorm, plain), {"_plain": plain})
    return _GLOBAL_CLASSES[plain]


@contextlib.contextmanager
def global_batchnorm(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``BatchNorm1d/2d/3d`` of ``module`` normalises over the global batch
    (:class:`GlobalBatchNorm`); afterwards they are plain layers again. A no-op outside a process group."""
    if not active():
        yield module
        return
    swapped: list[tuple[nn.Module, type]] = []
    for layer in module.modules():
        if type(layer) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            swapped.append((layer, type(layer)))
            layer.__class__ = _global_class(type(layer))
    try:
        yield module
    finally:
        for layer, plain in swapped:
            layer.__class__ = plain
