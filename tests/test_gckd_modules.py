"""GCKD building blocks: memory banks, kNN graph + GNN propagation, ALBEF/GCKD losses."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossret.errors import DataError
from crossret.textimage.losses import (
    cmkd_loss,
    itc_loss,
    itm_loss,
    momentum_similarity_targets,
    sample_hard_negatives,
    select_confident_target_pairs,
)
from crossret.textimage.memory import GckdMemory, MemoryBank, gather_if_distributed
from crossret.textimage.propagation import GraphPropagation, knn_graph


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("batches", [[3, 4, 2, 5], [7, 1, 9], [12], [0, 2, 11, 6, 3]])
def test_bank_matches_deque(batches: list[int]) -> None:
    cap, dim = 8, 4
    bank = MemoryBank(cap, dim)
    ref: deque[tuple[int, int]] = deque(maxlen=cap)
    counter = 0
    for i, n in enumerate(batches):
        ids = torch.arange(counter, counter + n)
        # Feature = one-hot-ish code of the id so the order of features can be checked too.
        feats = F.normalize(torch.stack([ids.float() + 1, torch.ones(n), torch.zeros(n), torch.zeros(n)], 1), dim=-1)
        bank.enqueue(feats, ids, domain=i % 2)
        ref.extend((int(j), i % 2) for j in ids)
        counter += n
        assert len(bank) == len(ref)
        assert bank.ids().tolist() == [r[0] for r in ref]
        assert bank.domains().tolist() == [r[1] for r in ref]
        exp = F.normalize(torch.tensor([[j + 1.0, 1.0, 0.0, 0.0] for j, _ in ref]).reshape(-1, dim), dim=-1)
        torch.testing.assert_close(bank.features(), exp)


@pytest.mark.parametrize("batches", [[3, 4, 2, 5], [7, 1, 9], [12], [0, 2, 11, 6, 3]])
def test_bank_dataset_indices_follow_the_fifo_through_wrap_around(batches: list[int]) -> None:
    """The index column moves with its feature row: after any sequence of enqueues (crossing the end, longer than
    the bank) indices() is the last C indices appended, oldest first, as a deque(maxlen=C) holds them."""
    cap, dim = 8, 4
    bank = MemoryBank(cap, dim)
    ref: deque[tuple[int, int]] = deque(maxlen=cap)
    rng = np.random.default_rng(0)
    for n in batches:
        index = torch.from_numpy(rng.integers(0, 50, size=n))
        feats = F.normalize(torch.stack([index.float() + 1, torch.ones(n), torch.zeros(n), torch.zeros(n)], 1), dim=-1)
        bank.enqueue(feats, index=index)
        ref.extend((int(i), int(i)) for i in index)
        assert bank.indices().tolist() == [r[0] for r in ref]
        # row k's feature encodes the index it was written with
        torch.testing.assert_close(bank.features()[:, 0] / bank.features()[:, 1], bank.indices().float() + 1)
    assert bank.ids().tolist() == [-1] * len(ref)
    with pytest.raises(DataError, match="index"):
        bank.enqueue(_unit(2, dim, 0), index=torch.arange(3))
    bank.reset()
    assert len(bank) == 0 and (bank.index_buf == -1).all()


def test_bank_overflow_keeps_newest_and_pointer_consistent() -> None:
    bank = MemoryBank(5, 3)
    bank.enqueue(_unit(2, 3, 0), torch.tensor([100, 101]))
    big = _unit(13, 3, 1)
    bank.enqueue(big, torch.arange(13))
    assert bank.is_full and bank.ids().tolist() == list(range(8, 13))
    torch.testing.assert_close(bank.features(), big[8:])
    bank.enqueue(_unit(1, 3, 2), torch.tensor([99]))
    assert bank.ids().tolist() == [9, 10, 11, 12, 99]


def test_bank_normalises_detaches_and_defaults() -> None:
    bank = MemoryBank(4, 3)
    x = torch.randn(2, 3, requires_grad=True) * 5
    bank.enqueue(x)
    assert not bank.features().requires_grad
    torch.testing.assert_close(bank.features().norm(dim=1), torch.ones(2))
    assert bank.ids().tolist() == [-1, -1] and bank.domains().tolist() == [0, 0]
    with pytest.raises(DataError):
        bank.enqueue(torch.randn(2, 5))
    with pytest.raises(DataError):
        bank.enqueue(torch.randn(2, 3), torch.arange(3))


def test_memory_state_dict_round_trip() -> None:
    mem = GckdMemory(capacity=6, dim=4)
    for step in range(3):
        mem.enqueue(_unit(4, 4, step), _unit(4, 4, 10 + step), _unit(4, 4, 20 + step), _unit(4, 4, 30 + step),
                    source_ids=torch.arange(4) + 10 * step)
    state = mem.state_dict()
    assert {"source_image.feats", "target_text.ptr", "source_text.ids_buf"} <= set(state)
    fresh = GckdMemory(capacity=6, dim=4)
    fresh.load_state_dict(state)
    for a, b in zip(mem.nodes(), fresh.nodes(), strict=True):
        torch.testing.assert_close(a, b)
    feats, mods, doms, ids = fresh.nodes()
    assert feats.shape == (24, 4)
    assert mods.tolist() == [0] * 6 + [1] * 6 + [0] * 6 + [1] * 6
    assert doms.tolist() == [0] * 12 + [1] * 12
    assert ids[:6].tolist() == [12, 13, 20, 21, 22, 23] and (ids[12:] == -1).all()
    # Continuing after the reload writes at the saved pointer.
    fresh.source_image.enqueue(_unit(1, 4, 99), torch.tensor([7]))
    assert fresh.source_image.ids().tolist() == [13, 20, 21, 22, 23, 7]


def test_gather_identity_without_process_group() -> None:
    t = torch.randn(3, 2, requires_grad=True)
    g = gather_if_distributed(t)
    assert not g.requires_grad
    torch.testing.assert_close(g, t.detach())


# ------------------------------------------------------------------------------------------------ graph


def _brute_knn(x: np.ndarray, k: int) -> set[tuple[int, int]]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    edges = set()
    for i in range(len(x)):
        order = [j for j in np.argsort(-s[i], kind="stable") if j != i][:k]
        for j in order:
            edges.add((i, int(j)))
            edges.add((int(j), i))
    return edges


@pytest.mark.parametrize(("n", "k", "chunk"), [(30, 3, 4096), (57, 10, 16), (5, 10, 4096)])
def test_knn_graph_exact(n: int, k: int, chunk: int) -> None:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(n), dtype=torch.float64).float()
    ei = knn_graph(x * 3.0, k, chunk_size=chunk)  # scale must not matter: cosine
    edges = {(int(a), int(b)) for a, b in ei.T}
    assert edges == _brute_knn(x.double().numpy(), k)
    assert all(a != b for a, b in edges)
    assert all((b, a) in edges for a, b in edges)
    assert ei.shape[1] == len(edges)  # no duplicates
    degrees = torch.bincount(ei[0], minlength=n)
    assert int(degrees.min()) >= min(k, n - 1)


def test_gnn_shapes_norm_grad_and_determinism() -> None:
    torch.manual_seed(0)
    gnn = GraphPropagation(16, k=4, conv="gcn", zero_init=False).eval()
    batch = _unit(6, 16, 1).requires_grad_(True)
    bank = _unit(20, 16, 2).requires_grad_(True)
    z = gnn(batch, bank)
    assert z.shape == (6, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    z.sum().backward()
    assert batch.grad is not None and batch.grad.abs().sum() > 0
    assert bank.grad is None  # bank entries are constants
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gnn.parameters())
    # Residual + propagation: output differs from the input but stays close at init.
    assert not torch.allclose(z.detach(), batch.detach())
    torch.manual_seed(0)
    gnn2 = GraphPropagation(16, k=4, conv="gcn", zero_init=False).eval()
    torch.testing.assert_close(gnn2(batch.detach(), bank.detach()), z.detach())


@pytest.mark.parametrize("conv", ["gcn", "sage"])
def test_gnn_zero_init_starts_as_the_identity_and_still_learns(conv: str) -> None:
    torch.manual_seed(0)
    gnn = GraphPropagation(16, k=4, conv=conv).eval()  # zero_init is the default
    batch = _unit(6, 16, 1).requires_grad_(True)
    bank = _unit(20, 16, 2)
    z = gnn(batch, bank)
    torch.testing.assert_close(z, batch.detach())  # norm(X + 0) = X for unit rows
    z.pow(3).sum().backward()
    # the zeroed second layer gets a gradient (its input is non-zero), so training moves it
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gnn.conv2.parameters() if p.ndim > 1)


def test_gnn_sage_and_node_types() -> None:
    torch.manual_seed(1)
    gnn = GraphPropagation(8, k=3, conv="sage", num_node_types=4).train()
    x, bank = _unit(4, 8, 3), _unit(8, 8, 4)
    types = torch.tensor([0, 1, 2, 3] * 3)
    z = gnn(x, bank, node_type=types)
    assert z.shape == (4, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    with pytest.raises(DataError):
        gnn(x, bank)


# ------------------------------------------------------------------------------------------------ losses


def _np_log_softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


def _np_itc(v: np.ndarray, t: np.ndarray, temp: float, ids: np.ndarray | None, soft: tuple | None,
            alpha: float) -> float:
    b = len(v)
    if ids is None:
        y = np.eye(b)
    else:
        y = (ids[:, None] == ids[None, :]).astype(float)
    y = y / y.sum(1, keepdims=True)
    ti2t, tt2i = (y, y) if soft is None else ((1 - alpha) * y + alpha * soft[0], (1 - alpha) * y + alpha * soft[1])
    li2t = -(ti2t * _np_log_softmax(v @ t.T / temp)).sum(1).mean()
    lt2i = -(tt2i * _np_log_softmax(t @ v.T / temp)).sum(1).mean()
    return 0.5 * (li2t + lt2i)


def test_itc_plain_identity_distilled_against_numpy() -> None:
    v, t = _unit(6, 5, 10).double(), _unit(6, 5, 11).double()
    temp = 0.07
    ids = torch.tensor([3, 1, 3, 2, 1, 5])
    vn, tn = v.numpy(), t.numpy()
    assert itc_loss(v, t, temp).item() == pytest.approx(_np_itc(vn, tn, temp, None, None, 0.4), rel=1e-5)
    got_id = itc_loss(v, t, temp, ids=ids).item()
    assert got_id == pytest.approx(_np_itc(vn, tn, temp, ids.numpy(), None, 0.4), rel=1e-5)
    assert got_id != pytest.approx(itc_loss(v, t, temp).item(), rel=1e-3)
    tv, tt = _unit(6, 5, 12), _unit(6, 5, 13)
    q = momentum_similarity_targets(tv, tt, temp)
    np_q = (np.exp(_np_log_softmax(tv.numpy() @ tt.numpy().T / temp)),
            np.exp(_np_log_softmax(tt.numpy() @ tv.numpy().T / temp)))
    torch.testing.assert_close(q[0].double(), torch.from_numpy(np_q[0]).double(), rtol=1e-4, atol=1e-6)
    got = itc_loss(v, t, temp, ids=ids, soft_targets=q, alpha=0.3).item()
    assert got == pytest.approx(_np_itc(vn, tn, temp, ids.numpy(), np_q, 0.3), rel=1e-4)


def test_itc_with_queue_candidates_and_unknown_ids() -> None:
    v, t = _unit(3, 4, 20), _unit(3, 4, 21)
    queue_t, queue_v = _unit(5, 4, 22), _unit(5, 4, 23)
    cand_ids = torch.tensor([0, 1, -1, 1, -1, 7, 0, 9])
    ids = torch.tensor([0, 1, -1])
    t_all, v_all = torch.cat([t, queue_t]), torch.cat([v, queue_v])
    y = torch.tensor([[1, 0, 0, 0, 0, 0, 1, 0], [0, 1, 0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.float)
    y = y / y.sum(1, keepdim=True)
    exp = 0.5 * (-(y * F.log_softmax(v @ t_all.T / 0.1, 1)).sum(1).mean()
                 - (y * F.log_softmax(t @ v_all.T / 0.1, 1)).sum(1).mean())
    got = itc_loss(v, t, 0.1, ids=ids, text_candidates=t_all, image_candidates=v_all, candidate_ids=cand_ids)
    torch.testing.assert_close(got, exp)


def test_cmkd_loss_and_confidence_mask() -> None:
    v, t, cand = _unit(4, 6, 30).requires_grad_(True), _unit(4, 6, 31), _unit(7, 6, 32)
    p = F.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(0)) * 3, 1)
    loss = cmkd_loss(v, t, (p, p), 0.1, text_candidates=cand, image_candidates=cand)
    exp = 0.5 * (-(p * F.log_softmax(v @ cand.T / 0.1, 1)).sum(1).mean()
                 - (p * F.log_softmax(t @ cand.T / 0.1, 1)).sum(1).mean())
    torch.testing.assert_close(loss, exp)
    loss.backward()
    assert v.grad is not None
    keep = p.max(1).values >= 0.5
    masked = cmkd_loss(v, t, (p, p), 0.1, text_candidates=cand, image_candidates=cand, min_confidence=0.5)
    exp_m = 0.5 * (-(p[keep] * F.log_softmax(v[keep] @ cand.T / 0.1, 1)).sum(1).mean()
                   - (p[keep] * F.log_softmax(t[keep] @ cand.T / 0.1, 1)).sum(1).mean())
    torch.testing.assert_close(masked, exp_m)
    zero = cmkd_loss(v, t, (p, p), 0.1, text_candidates=cand, image_candidates=cand, min_confidence=2.0)
    assert zero.item() == 0.0


def test_hard_negatives_never_same_identity_and_reproducible() -> None:
    ids = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(5)) * 5
    picks = []
    for _ in range(50):
        nt, ni = sample_hard_negatives(sim, sim.T.contiguous(), ids)
        assert (ids[nt] != ids).all() and (ids[ni] != ids).all()
        picks.append(nt)
    assert len({tuple(p.tolist()) for p in picks}) > 1  # it samples, it does not argmax
    a = sample_hard_negatives(sim, sim.T, ids, torch.Generator().manual_seed(7))
    b = sample_hard_negatives(sim, sim.T, ids, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hard_negatives_prefers_hard_and_handles_empty_rows() -> None:
    sim = torch.tensor([[9.0, 8.0, -9.0], [8.0, 9.0, -9.0], [0.0, 0.0, 9.0]])
    ids = torch.tensor([0, 1, 1])
    nt, _ = sample_hard_negatives(sim, sim, ids, torch.Generator().manual_seed(0))
    assert nt[0].item() == 1  # col 2 has weight ~e^-18, col 0 is the own pair
    # Row 1: only col 0 is allowed (col 1 own pair / same id, col 2 same id).
    assert nt[1].item() == 0
    excl = torch.zeros(3, 3, dtype=torch.bool)
    excl[2, :] = True
    nt, ni = sample_hard_negatives(sim, sim, ids, torch.Generator().manual_seed(0), exclude=(excl, excl))
    assert nt[2].item() == -1 and ni[2].item() == -1
    # Unknown ids (-1) exclude only the own pair.
    nt, _ = sample_hard_negatives(sim, sim, torch.tensor([-1, -1, -1]), torch.Generator().manual_seed(0))
    assert (nt != torch.arange(3)).all()


def test_itm_loss_hand_example() -> None:
    pos = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    neg = torch.tensor([[3.0, 0.0]])
    exp = (np.log1p(np.exp(-2.0)) + np.log(2.0) + np.log1p(np.exp(-3.0))) / 3
    assert itm_loss(pos, neg).item() == pytest.approx(exp, rel=1e-6)


def test_select_confident_pairs_exact() -> None:
    sim = torch.tensor([[0.9, 0.55, 0.1],
                        [0.8, 0.2, 0.3],
                        [0.1, 0.4, 0.45],
                        [0.2, 0.6, 0.5]])
    t, i = select_confident_target_pairs(sim, 0.5)
    assert list(zip(t.tolist(), i.tolist(), strict=True)) == [(0, 0), (1, 0), (3, 1)]
    t, i = select_confident_target_pairs(sim, 0.5, mutual=True)
    assert list(zip(t.tolist(), i.tolist(), strict=True)) == [(0, 0), (3, 1)]
    t, i = select_confident_target_pairs(sim, 0.55, best_only=False)
    assert list(zip(t.tolist(), i.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 0), (3, 1)]
    t, i = select_confident_target_pairs(sim, 0.55, best_only=False, mutual=True)
    assert list(zip(t.tolist(), i.tolist(), strict=True)) == [(0, 0), (3, 1)]
    t, _ = select_confident_target_pairs(sim, 0.95)
    assert t.numel() == 0
