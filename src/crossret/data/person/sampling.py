"""Batch samplers for GCKD training: identity-balanced batches of the labelled source
(:class:`IdentityBalancedBatchSampler`, ``P`` identities × ``K`` pairs) and seeded shuffled batches of the
unlabelled target (:class:`ShuffledBatchSampler`). Every epoch's batches are a pure function of
``(seed, epoch)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from crossret.errors import ConfigError, DataError
from crossret.limits import check_memory

__all__ = ["IdentityBalancedBatchSampler", "ShuffledBatchSampler", "check_sampling_memory"]


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_sampling_memory(n_identities: int, pairs_per_id: int) -> None:
    """Refuse an identity-balanced epoch that would not fit in memory: every epoch deals at least one chunk
    of ``pairs_per_id`` pairs per identity (int64 indices, and their batches)."""
    check_memory(16 * n_identities * pairs_per_id, f"k={pairs_per_id} pairs per identity (pairs_per_id) for "
                 f"{n_identities} identities", "lower k")


class IdentityBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``p`` distinct identities × ``k`` pairs each, for the labelled source.

    Per epoch (seeded by ``(seed, epoch)``, so every epoch is reproducible on its own):

    * each identity's pairs are shuffled and cut into chunks of ``k``; the last chunk is filled up by
      sampling the identity's pairs with replacement (so identities with fewer than ``k`` pairs work),
      hence every pair and every identity appears at least once per epoch;
    * chunks are dealt into ``max(ceil(chunks / p), largest chunk count)`` batches of ``p`` *distinct*
      identities, picking identities at random weighted by their remaining chunks (an identity is forced
      in when it would otherwise not fit into the remaining batches); a batch that runs out of
      identities with chunks left is topped up with extra chunks of other, random identities.

    Indices within a batch are grouped by identity (``k`` consecutive indices share an id).
    """

    def __init__(self, person_ids: np.ndarray | Sequence[int], p: int, k: int, seed: int = 0) -> None:
        ids = np.asarray(person_ids, dtype=np.int64).reshape(-1)
        self.p = _check_positive("p (identities per batch)", p)
        self.k = _check_positive("k (pairs per identity)", k)
        self.seed = _check_seed(seed)
        self.epoch = 0
        if ids.size == 0:
            raise DataError("identity-balanced sampling needs at least one pair")
        if (ids < 0).any():
            raise DataError(f"{int((ids < 0).sum())} pair(s) have unknown ids (-1); identity-balanced sampling "
                            "needs labels: use it on the labelled source, ShuffledBatchSampler on the target")
        order = np.argsort(ids, kind="stable")
        unique, starts = np.unique(ids[order], return_index=True)
        self._groups = np.split(order, starts[1:])
        if unique.size < self.p:
            raise ConfigError(f"p={self.p} identities per batch but the data has only {unique.size} identities; "
                              "lower p")
        check_sampling_memory(unique.size, self.k)
        self._chunks = np.array([math.ceil(g.size / self.k) for g in self._groups], dtype=np.int64)
        self._num_batches = max(math.ceil(int(self._chunks.sum()) / self.p), int(self._chunks.max()))

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
        rng = np.random.default_rng([self.seed, _check_seed(epoch)])
        k = self.k
        chunks: list[np.ndarray] = []
        for group, count in zip(self._groups, self._chunks, strict=True):
            perm = rng.permutation(group)
            pad = int(count) * k - group.size
            if pad:
                perm = np.concatenate([perm, rng.choice(group, size=pad, replace=True)])
            chunks.append(perm.reshape(int(count), k))
        remaining = self._chunks.copy()
        used = np.zeros_like(remaining)
        n_ids = remaining.size
        out: list[list[int]] = []
        for b in range(self._num_batches):
            left = self._num_batches - b
            forced = np.flatnonzero(remaining == left)  # these need a chunk in every remaining batch
            candidates = np.flatnonzero((remaining > 0) & (remaining < left))
            need = self.p - forced.size
            if candidates.size > need:
                # Weighted sampling without replacement (Efraimidis–Spirakis keys), O(n) per batch.
                keys = np.log(rng.random(candidates.size)) / remaining[candidates]
                picked = candidates[np.argpartition(-keys, need - 1)[:need]] if need else candidates[:0]
            else:
                picked = candidates
            chosen = np.concatenate([forced, picked])
            rows = [chunks[i][used[i]] for i in chosen]
            used[chosen] += 1
            remaining[chosen] -= 1
            short = self.p - chosen.size
            if short:
                # Not enough identities with chunks left: top up with fresh chunks of other identities.
                pool = np.setdiff1d(np.arange(n_ids), chosen, assume_unique=True)
                for i in rng.choice(pool, size=short, replace=False):
                    group = self._groups[i]
                    rows.append(rng.choice(group, size=k, replace=group.size < k))
            batch = np.concatenate(rows)
            # Shuffle the order of the identity blocks so forced identities are not always first.
            block_order = rng.permutation(self.p)
            out.append(batch.reshape(self.p, k)[block_order].reshape(-1).tolist())
        return out


class ShuffledBatchSampler(Sampler[list[int]]):
    """Seeded shuffled batches of ``batch_size`` indices out of ``n`` (the unlabelled target stream).

    Epoch ``e`` is the permutation drawn from ``(seed, e)``; ``drop_last`` (default) keeps every batch
    full, which the fixed-size memory-bank updates of GCKD expect.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = True) -> None:
        self.n = _check_positive("n (number of items)", n)
        self.batch_size = _check_positive("batch_size", batch_size)
        self.seed = _check_seed(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        if self.drop_last and self.n < self.batch_size:
            raise ConfigError(f"batch_size {self.batch_size} is larger than the {self.n} items and drop_last is "
                              "set, so no batch would be produced; lower batch_size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        perm = np.random.default_rng([self.seed, _check_seed(epoch)]).permutation(self.n)
        return [perm[i:i + self.batch_size].tolist() for i in range(0, len(self) * self.batch_size, self.batch_size)]
