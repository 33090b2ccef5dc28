"""FIFO embedding memory for GCKD's graph-based multi-modal propagation (docs/gckd.md, ambiguity A2).

GCKD keeps "the most recent embeddings of a specified number of samples (C) for each modality" from
both domains. The reading used here (A2 default) is **four** banks — source/target × image/text — each
a ring buffer of ``C`` L2-normalised **teacher** features (no gradient), as ALBEF's momentum queue, with
a parallel id queue (source identity ids; ``-1`` = unknown, the target default), a domain tag per
slot (``0`` source, ``1`` target), so the "two mixed banks" reading can be rebuilt from the same data, and
the dataset index of each item (the target image / caption row; ``-1`` = unknown), which lets the
cross-domain ITM mine pseudo-pairs over the banks and fetch their inputs by index.

Everything is stored in registered buffers: a bank saves in ``state_dict`` and moves with ``.to()``.
No collective is issued unless ``torch.distributed.is_initialized()`` (see :func:`gather_if_distributed`).
The GCKD trainer gathers the global batch itself under torchrun and enqueues it with ``gather=False``, so
every rank's banks hold what one process's would (docs/distributed.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from crossret.errors import ConfigError, DataError
from crossret.limits import check_memory

SOURCE = 0
TARGET = 1
UNKNOWN_ID = -1
UNKNOWN_INDEX = -1

log = logging.getLogger("crossret.gckd")


@torch.no_grad()
def gather_if_distributed(t: Tensor) -> Tensor:
    """ALBEF ``concat_all_gather``: ``t (n, ...)`` → ``(world·n, ...)`` concatenated over ranks, detached.

    The identity (detached) when ``torch.distributed`` is unavailable, not initialised or has one rank,
    so single-process training and tests never touch a process group. All ranks must pass the same
    ``n`` (as ALBEF, which drops the last incomplete batch).
    """
    t = t.detach()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


class MemoryBank(nn.Module):
    """A FIFO ring buffer of ``capacity`` L2-normalised ``dim``-d features with ids, domain tags and
    dataset indices.

    Buffers: ``feats (C, D)`` float32, ``ids_buf (C,)`` int64, ``domain_buf (C,)`` int64, ``index_buf
    (C,)`` int64 (dataset index, ``-1`` unknown), ``ptr ()`` (next write slot) and ``count ()`` (filled
    slots). Semantics are exactly those of a ``collections.deque(maxlen=C)`` that appends the batch rows
    one by one: a batch that crosses the end wraps around, and a batch longer than ``C`` leaves only its
    newest ``C`` rows.

    A state dict written before ``index_buf`` existed still loads: every index is then ``-1`` (logged as
    a warning, and :attr:`indices_restored` is False).
    """

    feats: Tensor
    ids_buf: Tensor
    domain_buf: Tensor
    index_buf: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, capacity: int, dim: int) -> None:
        super().__init__()
        if int(capacity) <= 0 or int(dim) <= 0:
            raise ConfigError(f"MemoryBank(capacity={capacity}, dim={dim}): both must be positive integers")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.register_buffer("feats", torch.zeros(self.capacity, self.dim))
        self.register_buffer("ids_buf", torch.full((self.capacity,), UNKNOWN_ID, dtype=torch.long))
        self.register_buffer("domain_buf", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("index_buf", torch.full((self.capacity,), UNKNOWN_INDEX, dtype=torch.long))
        self.indices_restored = True
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.count)

    @property
    def is_full(self) -> bool:
        return int(self.count) == self.capacity

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "index_buf"
        self.indices_restored = key in state_dict or prefix + "feats" not in state_dict
        if not self.indices_restored:  # written before the bank stored dataset indices
            state_dict[key] = torch.full_like(self.index_buf, UNKNOWN_INDEX)
            log.warning("memory bank %s: the saved state has no dataset indices (written by an earlier crossret); "
                        "its %d entries get index -1 (not minable as pseudo-pairs until replaced)",
                        prefix.rstrip(".") or "bank", int(state_dict.get(prefix + "count", torch.tensor(0))))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def enqueue(self, features: Tensor, ids: Tensor | None = None, domain: int | Tensor = SOURCE, *,
                gather: bool = True, normalize: bool = True, index: Tensor | None = None) -> None:
        """Append ``features (n, D)`` with ``ids (n,)`` (None → all ``-1``), ``domain`` (an int tag or
        ``(n,)``) and dataset ``index (n,)`` (None → all ``-1``) in row order, overwriting the oldest slots.

        Features are detached, cast to float32 and (``normalize``) re-L2-normalised, so a bf16 caller
        cannot leave unnormalised rows in the graph. With ``gather`` the rows of all ranks are gathered
        first (:func:`gather_if_distributed`, a no-op outside DDP), as ALBEF's ``_dequeue_and_enqueue``.
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise DataError(f"MemoryBank.enqueue: features must be (n, {self.dim}), got {tuple(features.shape)}")
        n = features.shape[0]
        dev = self.feats.device
        ids_t = (torch.full((n,), UNKNOWN_ID, dtype=torch.long, device=features.device) if ids is None
                 else torch.as_tensor(ids, device=features.device).long().reshape(-1))
        dom_t = torch.as_tensor(domain, device=features.device).long().reshape(-1).expand(n) if n else \
            torch.zeros(0, dtype=torch.long, device=features.device)
        idx_t = (torch.full((n,), UNKNOWN_INDEX, dtype=torch.long, device=features.device) if index is None
                 else torch.as_tensor(index, device=features.device).long().reshape(-1))
        if ids_t.shape[0] != n or dom_t.shape[0] != n or idx_t.shape[0] != n:
            raise DataError(f"MemoryBank.enqueue: ids/domain/index must have {n} entries, got {ids_t.shape[0]}/"
                            f"{dom_t.shape[0]}/{idx_t.shape[0]}")
        if gather:
            features, ids_t, dom_t, idx_t = (gather_if_distributed(features), gather_if_distributed(ids_t),
                                             gather_if_distributed(dom_t.contiguous()), gather_if_distributed(idx_t))
            n = features.shape[0]
        if n == 0:
            return
        feats = features.detach().to(device=dev, dtype=torch.float32)
        if normalize:
            feats = F.normalize(feats, dim=-1)
        # Row i of the batch goes to slot (ptr + i) mod C; for n > C only the last C writes survive,
        # so keep rows [n - C, n) and write them to their final slots in one indexed assignment.
        start = max(0, n - self.capacity)
        slots = (self.ptr + torch.arange(start, n, device=dev)) % self.capacity
        self.feats[slots] = feats[start:]
        self.ids_buf[slots] = ids_t[start:].to(dev)
        self.domain_buf[slots] = dom_t[start:].to(dev)
        self.index_buf[slots] = idx_t[start:].to(dev)
        self.ptr.copy_((self.ptr + n) % self.capacity)
        self.count.copy_((self.count + n).clamp(max=self.capacity))

    def _order(self) -> Tensor:
        """Slot indices of the filled entries, oldest first."""
        c = int(self.count)
        return (self.ptr - c + torch.arange(c, device=self.feats.device)) % self.capacity

    def features(self) -> Tensor:
        """The filled features ``(count, D)``, oldest first (a detached copy)."""
        return self.feats[self._order()]

    def ids(self) -> Tensor:
        """The ids ``(count,)`` of :meth:`features` (``-1`` = unknown)."""
        return self.ids_buf[self._order()]

    def domains(self) -> Tensor:
        """The domain tags ``(count,)`` of :meth:`features` (0 source, 1 target)."""
        return self.domain_buf[self._order()]

    def indices(self) -> Tensor:
        """The dataset indices ``(count,)`` of :meth:`features` (``-1`` = unknown)."""
        return self.index_buf[self._order()]

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the bank (keeps the allocation)."""
        self.feats.zero_()
        self.ids_buf.fill_(UNKNOWN_ID)
        self.domain_buf.zero_()
        self.index_buf.fill_(UNKNOWN_INDEX)
        self.ptr.zero_()
        self.count.zero_()


def check_bank_memory(capacity: int, dim: int) -> None:
    """Refuse banks that would not fit in memory, before anything is allocated (ConfigError)."""
    if isinstance(capacity, int) and isinstance(dim, int) and capacity > 0 and dim > 0:
        # four banks of float32 features and three int64 columns, and the graph's copy of every node
        check_memory(4 * capacity * (8 * dim + 24), f"memory banks of memory_size={capacity} x {dim} features",
                     "lower memory_size (--set)")


class GckdMemory(nn.Module):
    """The four GCKD banks M_v^s, M_t^s, M_v^t, M_t^t (docs/gckd.md), each ``capacity × dim``.

    :meth:`nodes` returns the bank part of the GMP graph in the fixed order
    ``[M_v^s; M_t^s; M_v^t; M_t^t]`` with modality (0 image, 1 text), domain and id per node.
    """

    ORDER = (("source", "image"), ("source", "text"), ("target", "image"), ("target", "text"))

    def __init__(self, capacity: int = 4096, dim: int = 256) -> None:
        super().__init__()
        check_bank_memory(capacity, dim)
        self.source_image = MemoryBank(capacity, dim)
        self.source_text = MemoryBank(capacity, dim)
        self.target_image = MemoryBank(capacity, dim)
        self.target_text = MemoryBank(capacity, dim)

    def bank(self, domain: str, modality: str) -> MemoryBank:
        """The bank for ``domain`` in {"source", "target"} and ``modality`` in {"image", "text"}."""
        if (domain, modality) not in self.ORDER:
            raise ConfigError(f"GckdMemory.bank({domain!r}, {modality!r}): expected source/target and image/text")
        return getattr(self, f"{domain}_{modality}")

    @torch.no_grad()
    def enqueue(self, source_image: Tensor, source_text: Tensor, target_image: Tensor, target_text: Tensor, *,
                source_ids: Tensor | None = None, target_image_ids: Tensor | None = None,
                target_text_ids: Tensor | None = None, gather: bool = True, source_index: Tensor | None = None,
                target_image_index: Tensor | None = None, target_text_index: Tensor | None = None) -> None:
        """Enqueue one step's teacher features ``(B_*, D)`` into the four banks (docs/gckd.md).

        Source image and text share ``source_ids`` and ``source_index`` (pair rows); target ids default to
        ``-1`` (unlabelled, A1); ``target_image_index`` / ``target_text_index`` are the target image /
        caption rows (``-1`` when None).
        """
        self.source_image.enqueue(source_image, source_ids, SOURCE, gather=gather, index=source_index)
        self.source_text.enqueue(source_text, source_ids, SOURCE, gather=gather, index=source_index)
        self.target_image.enqueue(target_image, target_image_ids, TARGET, gather=gather, index=target_image_index)
        self.target_text.enqueue(target_text, target_text_ids, TARGET, gather=gather, index=target_text_index)

    @property
    def indices_restored(self) -> bool:
        """False when the last loaded state dict had no dataset indices (an earlier crossret's)."""
        return all(self.bank(d, m).indices_restored for d, m in self.ORDER)

    def nodes(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(features (M, D), modality (M,), domain (M,), ids (M,))`` over the four banks in ORDER."""
        feats, mods, doms, ids = [], [], [], []
        for domain, modality in self.ORDER:
            b = self.bank(domain, modality)
            f = b.features()
            feats.append(f)
            mods.append(torch.full((f.shape[0],), 0 if modality == "image" else 1, dtype=torch.long,
                                   device=f.device))
            doms.append(b.domains())
            ids.append(b.ids())
        return torch.cat(feats), torch.cat(mods), torch.cat(doms), torch.cat(ids)
