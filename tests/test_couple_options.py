"""COUPLE's newer options (crossret.hashing.couple): the select-ratio schedule (``select_ratio_end``),
classifier agreement (``select_agreement``), progressive target seeding (``target_seed_weight``),
endpoint Mixup pairs (``mix_pairs``), the high-level Mixup gradient (``high_mixup_detach``) and the
mean-teacher network (``ema_decay``).

Every behaviour is checked against values computed another way: the networks the refreshes see are
captured by wrapping ``Couple._refresh``, the diffusion's seed mass by wrapping ``clip_to_feasible``,
the raw weights after every optimiser step by a global step hook (for an independent EMA)."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from _couple_common import BITS, fit_codes, gaussian_domains, stop_after, tiny, without_timings
from crossret.errors import ConfigError, FileFormatError
from crossret.graph.walks import random_walks
from crossret.hashing import make_method
from crossret.hashing.couple import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    Couple,
    CoupleConfig,
    _Selection,
    read_checkpoint,
)
from crossret.hashing.couple import selection as couple_selection
from crossret.hashing.deep import ENCODE_BATCH
from crossret.hashing.registry import load_method
from crossret.storage.sealed import save_torch

N_PER_SIDE = 60  # targets (and sources) of gaussian_domains()


@pytest.fixture(scope="module")
def domains():
    """(source, unlabelled target): 60 + 60 points in 16-d."""
    source, target = gaussian_domains()
    return source, target.without_labels()


def assert_identical_fits(source, target, config_a: CoupleConfig, config_b: CoupleConfig) -> None:
    """Two configurations that must train identically: bit-identical codes and epoch logs."""
    a, a_real = fit_codes(source, target, config_a)
    b, b_real = fit_codes(source, target, config_b)
    assert np.array_equal(a_real, b_real)
    assert without_timings(a.diagnostics["epochs"]) == without_timings(b.diagnostics["epochs"])


def refresh_records(method: Couple) -> list[dict]:
    return [r for r in method.diagnostics["epochs"] if "selected" in r]


def float_tensors(net: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters then floating-point buffers (BN running statistics), detached copies."""
    return [t.detach().clone() for t in itertools.chain(net.parameters(), net.buffers()) if t.is_floating_point()]


@pytest.fixture
def refresh_spy(monkeypatch):
    """Wrap ``Couple._refresh``: per call, the classifier argmax of the network it is handed (computed
    here, as the refresh does, in eval mode), that network, copies of its weights, and the ratio."""
    calls: list[dict] = []
    original = Couple._refresh

    def spy(self, net, x_all, source_labels, n_s, num_classes, previous, ratio):
        was_training = net.training
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(x_all[lo:lo + ENCODE_BATCH]).logits for lo in range(0, x_all.shape[0],
                                                                                       ENCODE_BATCH)])
        net.train(was_training)
        calls.append({"classifier": logits[n_s:].argmax(dim=1).numpy(), "net": net, "ratio": ratio,
                      "weights": float_tensors(net)})
        return original(self, net, x_all, source_labels, n_s, num_classes, previous, ratio)

    monkeypatch.setattr(Couple, "_refresh", spy)
    return calls


# ---------------------------------------------------------------------------------------- 1. validation
# (the bad values of the new options are in test_couple.py's BAD_VALUES)
def test_error_messages_state_the_allowed_values():
    with pytest.raises(ConfigError, match=r"couple: mix_pairs must be one of consecutive, endpoints, got 'ends'"):
        CoupleConfig(mix_pairs="ends").validate()
    with pytest.raises(ConfigError, match=r"ema_decay must be a number in \[0.0, 0.99999\], got 1.0"):
        CoupleConfig(ema_decay=1.0).validate()
    with pytest.raises(ConfigError, match=r"select_ratio_end must be a number in \[0.0, 1.0\], got 1.5"):
        CoupleConfig(select_ratio_end=1.5).validate()
    with pytest.raises(ConfigError, match=r"target_seed_weight must be a number in \[0.0, inf\], got -0.1"):
        CoupleConfig(target_seed_weight=-0.1).validate()
    with pytest.raises(ConfigError, match="select_agreement must be true or false, got 'yes'"):
        CoupleConfig(select_agreement="yes").validate()
    with pytest.raises(ConfigError, match="high_mixup_detach must be true or false, got 0"):
        CoupleConfig(high_mixup_detach=0).validate()


def test_defaults_and_boundary_values_of_the_new_options():
    default = CoupleConfig()
    assert (default.select_ratio_end, default.select_agreement, default.target_seed_weight, default.mix_pairs,
            default.high_mixup_detach, default.ema_decay) == (None, False, 0.0, "consecutive", True, 0.0)
    for overrides in ({"select_ratio_end": 0.0}, {"select_ratio_end": 1.0}, {"select_ratio_end": None},
                      {"ema_decay": 0.99999}, {"ema_decay": 0}, {"target_seed_weight": 1e6},
                      {"mix_pairs": "endpoints"}, {"select_agreement": True}, {"high_mixup_detach": False}):
        config = CoupleConfig(**overrides)
        assert config.validate() is config
    method = make_method("couple", BITS, overrides={"select_ratio_end": 0.9, "select_agreement": True,
                                                    "target_seed_weight": 0.5, "mix_pairs": "endpoints",
                                                    "high_mixup_detach": False, "ema_decay": 0.9})
    cfg = method.config
    assert (cfg.select_ratio_end, cfg.select_agreement, cfg.target_seed_weight, cfg.mix_pairs,
            cfg.high_mixup_detach, cfg.ema_decay) == (0.9, True, 0.5, "endpoints", False, 0.9)


# ---------------------------------------------------------------------------------------- 2. select_ratio_end
def _fraction_schedule(start: str, end: str | None, epochs: int, warmup: int, epoch: int) -> Fraction:
    """Exact rational reference of the schedule."""
    if end is None:
        return Fraction(start)
    span = max(epochs - 1 - warmup, 1)
    t = min(max(Fraction(epoch - warmup, span), Fraction(0)), Fraction(1))
    return Fraction(start) + (Fraction(end) - Fraction(start)) * t


@pytest.mark.parametrize(("epochs", "warmup", "start", "end", "expected"), [
    # hand-computed: epoch index -> ratio
    (5, 1, "0.2", "0.8", {0: 0.2, 1: 0.2, 2: 0.4, 3: 0.6, 4: 0.8, 9: 0.8}),
    (4, 0, "0.5", "0.2", {0: 0.5, 1: 0.4, 2: 0.3, 3: 0.2}),  # a decreasing schedule
    (3, 1, "0", "1", {0: 0.0, 1: 0.0, 2: 1.0}),  # span 1: the last epoch reaches the end value
    (2, 1, "0.1", "0.9", {0: 0.1, 1: 0.1}),  # span clamped to 1: the only refresh keeps the start value
    (1, 0, "0.3", "0.7", {0: 0.3}),
    (3, 5, "0.3", "0.7", {0: 0.3, 2: 0.3}),  # warm-up longer than training: clipped at the start
    (70, 5, "0.5", None, {5: 0.5, 40: 0.5, 69: 0.5}),  # no end: constant
])
def test_select_ratio_schedule_exact_values(epochs, warmup, start, end, expected):
    method = Couple(BITS, config=CoupleConfig(epochs=epochs, warmup_epochs=warmup, select_ratio=float(start),
                                              select_ratio_end=None if end is None else float(end)))
    for epoch, want in expected.items():
        got = method._select_ratio_at(epoch)
        assert got == pytest.approx(want, abs=1e-12)
        assert got == pytest.approx(float(_fraction_schedule(start, end, epochs, warmup, epoch)), abs=1e-12)


def test_select_ratio_schedule_matches_a_rational_reference_on_many_configs():
    rng = np.random.default_rng(11)
    for _ in range(40):
        epochs, warmup = int(rng.integers(1, 30)), int(rng.integers(0, 10))
        start, end = (str(Fraction(int(v), 100)) for v in rng.integers(0, 101, size=2))
        method = Couple(BITS, config=CoupleConfig(epochs=epochs, warmup_epochs=warmup,
                                                  select_ratio=float(Fraction(start)),
                                                  select_ratio_end=float(Fraction(end))))
        values = [method._select_ratio_at(e) for e in range(epochs)]
        for epoch, got in enumerate(values):
            assert got == pytest.approx(float(_fraction_schedule(start, end, epochs, warmup, epoch)), abs=1e-12)
            assert min(float(Fraction(start)), float(Fraction(end))) - 1e-12 <= got
            assert got <= max(float(Fraction(start)), float(Fraction(end))) + 1e-12
        # monotone in the direction of the schedule
        steps = np.diff(values) * np.sign(float(Fraction(end) - Fraction(start)))
        assert (steps >= -1e-12).all()


@pytest.mark.parametrize(("overrides", "ratios"), [
    # refreshes at epoch indices 1, 2, 3; span 4 - 1 - 1 = 2 -> t = 0, 1/2, 1
    ({}, [0.2, 0.5, 0.8]),
    # graph_every=2, 6 epochs: refreshes at epoch indices 1, 3, 5; span 4 -> t = 0, 1/2, 1
    ({"epochs": 6, "graph_every": 2}, [0.2, 0.5, 0.8]),
])
def test_selected_count_follows_the_schedule_in_a_fit(domains, refresh_spy, overrides, ratios):
    source, target = domains
    method, _ = fit_codes(source, target, tiny(select_ratio=0.2, select_ratio_end=0.8, select_balance=False,
                                               **overrides))
    records = refresh_records(method)
    assert [call["ratio"] for call in refresh_spy] == pytest.approx(ratios, abs=1e-12)
    assert len(records) == len(ratios) == len(method.selection_history)
    budgets = [round(r * N_PER_SIDE) for r in ratios]
    assert budgets == [12, 30, 48]
    for record, history, budget in zip(records, method.selection_history, budgets, strict=True):
        assert record["selected"] == min(budget, record["targets_reached"]) == history["selected"].size
    counts = [r["selected"] for r in records]
    assert counts[0] < counts[1] < counts[2], "the selected set grows with the schedule on this data"


def test_constant_schedule_equals_no_schedule(domains):
    source, target = domains
    assert_identical_fits(source, target, tiny(select_ratio=0.4), tiny(select_ratio=0.4, select_ratio_end=0.4))


# ---------------------------------------------------------------------------------------- 3. select_agreement
@pytest.mark.parametrize("balanced", [False, True])
def test_agreement_selects_only_targets_the_classifier_agrees_with(domains, refresh_spy, balanced):
    source, target = domains
    method, _ = fit_codes(source, target, tiny(select_agreement=True, select_balance=balanced))
    records = refresh_records(method)
    assert len(refresh_spy) == len(records) == len(method.selection_history) == 3
    for call, record, history in zip(refresh_spy, records, method.selection_history, strict=True):
        chosen, pseudo = history["selected"], history["pseudo_labels"]
        assert np.array_equal(pseudo[chosen], call["classifier"][chosen])
        # the number of reached targets that agree, from the diagnostics
        agreeing = round(record["classifier_agreement"] * record["targets_reached"])
        assert agreeing <= int((pseudo == call["classifier"]).sum())
        assert chosen.size <= agreeing
        if balanced:
            budget = np.round(0.5 * np.bincount(pseudo, minlength=3)).astype(int)
            assert (np.bincount(pseudo[chosen], minlength=3) <= budget).all()
        else:
            assert chosen.size == min(round(0.5 * N_PER_SIDE), agreeing)
    # not vacuous: at the first refresh the classifier disagrees with most diffusion labels
    assert records[0]["selected"] < round(0.5 * N_PER_SIDE)


@pytest.mark.parametrize("balanced", [False, True])
def test_agreement_at_the_first_refresh_filters_the_plain_selection(domains, refresh_spy, balanced):
    """The first refresh sees the same warmed-up network with and without the option, hence the same
    labels and ranking: the agreeing part of the plain selection must survive, nothing else may enter
    unless it agrees, and every class budget is still respected."""
    source, target = domains
    plain = Couple(BITS, config=tiny(epochs=2, select_balance=balanced)).fit(source, target)
    agree = Couple(BITS, config=tiny(epochs=2, select_balance=balanced, select_agreement=True)).fit(source, target)
    plain_call, agree_call = refresh_spy
    assert np.array_equal(plain_call["classifier"], agree_call["classifier"])
    plain_h, agree_h = plain.selection_history[0], agree.selection_history[0]
    assert np.array_equal(plain_h["pseudo_labels"], agree_h["pseudo_labels"])
    labels, classifier = agree_h["pseudo_labels"], agree_call["classifier"]
    agrees = set(np.flatnonzero(labels == classifier).tolist())
    plain_set, agree_set = set(plain_h["selected"].tolist()), set(agree_h["selected"].tolist())
    assert agree_set <= agrees
    assert plain_set & agrees <= agree_set
    assert plain_set - agrees, "not vacuous: the plain selection holds disagreeing targets"
    assert agree_set != plain_set
    record_plain, record_agree = refresh_records(plain)[0], refresh_records(agree)[0]
    assert record_plain["classifier_agreement"] == record_agree["classifier_agreement"]
    assert record_plain["targets_reached"] == record_agree["targets_reached"]


def test_agreement_also_restricts_the_positive_rule(domains, refresh_spy):
    source, target = domains
    method, _ = fit_codes(source, target, tiny(select_agreement=True, select_rule="positive"))
    for call, history in zip(refresh_spy, method.selection_history, strict=True):
        chosen = history["selected"]
        assert np.array_equal(history["pseudo_labels"][chosen], call["classifier"][chosen])


def test_agreement_is_a_no_op_for_classifier_selection(domains):
    """Classifier selection labels targets by the classifier itself: every target agrees."""
    source, target = domains
    _, plain_real = fit_codes(source, target, tiny(selection="classifier"))
    agree, agree_real = fit_codes(source, target, tiny(selection="classifier", select_agreement=True))
    assert np.array_equal(plain_real, agree_real)
    # every target stays a candidate: the per-class top 50 % keeps round(0.5 * n_c) of each pseudo-class
    assert [r["selected"] for r in refresh_records(agree)] == [
        int(np.round(0.5 * np.bincount(h["pseudo_labels"])).sum()) for h in agree.selection_history]


# ---------------------------------------------------------------------------------------- 4. target_seed_weight
@pytest.fixture
def diffusion_spy(monkeypatch):
    """Record the seed mass handed to ``clip_to_feasible`` (before clipping) and the solver's results."""
    log = {"seeds": [], "results": []}
    clip, solve = couple_selection.clip_to_feasible, couple_selection.l2_flow_diffusion_active_set

    def clip_spy(adjacency, seed, degree, *args, **kwargs):
        log["seeds"].append((adjacency.copy(), np.array(seed, copy=True), np.array(degree, copy=True)))
        return clip(adjacency, seed, degree, *args, **kwargs)

    def solve_spy(*args, **kwargs):
        result = solve(*args, **kwargs)
        log["results"].append(result)
        return result

    monkeypatch.setattr(couple_selection, "clip_to_feasible", clip_spy)
    monkeypatch.setattr(couple_selection, "l2_flow_diffusion_active_set", solve_spy)
    return log


def _expected_target_seed(degree: np.ndarray, n_s: int, previous: dict | None, weight: float,
                          target_fill: float) -> np.ndarray:
    """The target rows of the seed mass: ``w · α · deg`` on the previous selection's pseudo-classes."""
    expected = np.zeros((degree.size - n_s, 3))
    if previous is None or weight == 0:
        return expected
    alpha = 1.0 + target_fill * degree[n_s:].sum() / degree[:n_s].sum()  # class_seed_mass's multiplier
    chosen = previous["selected"]
    expected[chosen, previous["pseudo_labels"][chosen]] = weight * alpha * degree[n_s + chosen]
    return expected


def test_target_seeds_are_added_from_the_second_refresh_on(domains, diffusion_spy):
    source, target = domains
    n_s, weight = source.n, 0.5
    plain = Couple(BITS, config=tiny()).fit(source, target)
    plain_seeds, plain_results = list(diffusion_spy["seeds"]), list(diffusion_spy["results"])
    diffusion_spy["seeds"].clear()
    diffusion_spy["results"].clear()
    seeded = Couple(BITS, config=tiny(target_seed_weight=weight)).fit(source, target)
    seeds, results = diffusion_spy["seeds"], diffusion_spy["results"]
    assert len(seeds) == len(plain_seeds) == 3

    # first refresh: nothing to seed from, everything identical
    assert np.array_equal(seeds[0][1], plain_seeds[0][1])
    assert not seeds[0][1][n_s:].any()
    assert np.array_equal(results[0].potential, plain_results[0].potential)
    for key in ("selected", "pseudo_labels"):
        assert np.array_equal(seeded.selection_history[0][key], plain.selection_history[0][key])
    assert without_timings(seeded.diagnostics["epochs"][:2]) == without_timings(plain.diagnostics["epochs"][:2])

    # second refresh: the network (hence graph and degrees) is still the same, only the seed differs
    (adj_p, seed_p, deg_p), (adj_s, seed_s, deg_s) = plain_seeds[1], seeds[1]
    assert (adj_p != adj_s).nnz == 0 and np.array_equal(deg_p, deg_s)
    assert np.array_equal(seed_s[:n_s], seed_p[:n_s]) and not seed_p[n_s:].any()
    expected = _expected_target_seed(deg_s, n_s, seeded.selection_history[0], weight, 3.0)
    assert expected.any()
    np.testing.assert_allclose(seed_s[n_s:], expected, rtol=1e-12, atol=0)
    assert not np.array_equal(results[1].potential, plain_results[1].potential)

    # every later refresh seeds the previous refresh's selection
    for k in range(1, 3):
        _, seed, degree = seeds[k]
        want = _expected_target_seed(degree, n_s, seeded.selection_history[k - 1], weight, 3.0)
        np.testing.assert_allclose(seed[n_s:], want, rtol=1e-12, atol=0)
        assert (seed[n_s:] > 0).sum() == seeded.selection_history[k - 1]["selected"].size


def test_zero_target_seed_weight_never_seeds_targets(domains, diffusion_spy):
    source, target = domains
    _, real = fit_codes(source, target, tiny(target_seed_weight=0.0, disagreement_weight=0.5))
    assert len(diffusion_spy["seeds"]) == 3
    assert all(not seed[source.n:].any() for _, seed, _ in diffusion_spy["seeds"])
    _, default_real = fit_codes(source, target, tiny(disagreement_weight=0.5))
    assert np.array_equal(real, default_real)


def test_target_seed_weight_without_a_selection_changes_nothing(domains):
    """With ``select_ratio = 0`` no target is ever selected, so no target ever seeds: bit-identical."""
    source, target = domains
    assert_identical_fits(source, target, tiny(select_ratio=0.0), tiny(select_ratio=0.0, target_seed_weight=2.0))


# ---------------------------------------------------------------------------------------- 5. mix_pairs
N_S_TOY = 4


def _toy_selection() -> _Selection:
    """Sources 0-1-2 in a chain, source 3 alone; targets t0 = node 4 (next to 0), t1 = node 5 (next to 2),
    t2 = node 6 (next to 3, *not* selected); t0-t1 also linked. Walks from 3 can only end in t2."""
    edges = [(0, 1, 1.0), (1, 2, 2.0), (0, 4, 1.0), (2, 5, 1.5), (3, 6, 1.0), (4, 5, 1.0)]
    rows = [a for a, b, _ in edges] + [b for a, b, _ in edges]
    cols = [b for a, b, _ in edges] + [a for a, b, _ in edges]
    data = [w for _, _, w in edges] * 2
    graph = sp.csr_matrix((data, (rows, cols)), shape=(7, 7))
    return _Selection(pseudo_labels=np.array([0, 1, 2]), selected=np.array([True, True, False]), graph=graph)


def _mixup(mode: str, seed: int, u_max: float, src: np.ndarray, walk_length: int = 4):
    method = Couple(BITS, config=tiny(mix_pairs=mode, walk_length=walk_length))
    rng = np.random.default_rng(seed)
    pairs = method._mixup_pairs(rng, _toy_selection(), src, np.arange(3), torch.zeros(src.size, 2),
                                torch.zeros(3, 2), N_S_TOY, u_max)
    return pairs, rng


SRC = np.tile(np.arange(N_S_TOY), 50)
STOP = np.arange(7) >= N_S_TOY


def test_endpoint_pairs_mix_the_walk_start_with_the_target_it_reached():
    u_max = 0.3
    (a, b, lam), rng = _mixup("endpoints", 5, u_max, SRC)
    graph = _toy_selection().graph
    # independent reproduction: the same walks from a copy of the generator
    reference = np.random.default_rng(5)
    walks = random_walks(graph, SRC, 4, reference, stop=STOP)
    usable = walks.reached & np.isin(walks.end, [4, 5])
    assert np.array_equal(a, SRC[usable])
    assert np.array_equal(b, walks.end[usable])
    np.testing.assert_allclose(lam, 1.0 - reference.random(int(usable.sum())) * u_max, rtol=0, atol=0)
    assert rng.bit_generator.state == reference.bit_generator.state, "no other random numbers drawn"
    # invariants
    assert a.size > 0 and a.shape == b.shape == lam.shape
    assert (a < N_S_TOY).all() and not (a == 3).any(), "source 3 only reaches the unselected t2"
    assert set(b.tolist()) <= {4, 5}
    assert all(graph[bi, :N_S_TOY].nnz > 0 for bi in b), "the end is entered from a source node"
    assert ((lam >= 1.0 - u_max) & (lam <= 1.0)).all()
    # endpoints need not be adjacent: a walk from 1 (no target neighbour) pairs 1 with a target
    assert (a == 1).any() and all(graph[1, bi] == 0 for bi in b[a == 1])


def test_consecutive_pairs_are_adjacent_path_nodes():
    u_max = 0.9
    (a, b, lam), _ = _mixup("consecutive", 5, u_max, SRC)
    graph = _toy_selection().graph
    assert a.size > 0
    assert all(graph[ai, bi] > 0 for ai, bi in zip(a, b, strict=True)), "a and b are consecutive on the path"
    assert (a < N_S_TOY).all(), "a walk's nodes before its end are all source nodes"
    assert not np.isin(b, [N_S_TOY + 2]).any() and not (a == 3).any()
    assert ((lam > 0.0) & (lam <= 1.0)).all()


def test_both_modes_use_the_same_walks_and_agree_on_one_hop_walks():
    """Same generator → same walks and the same uniforms; on a one-hop walk (source → target) the
    consecutive pair is (start, end) with λ = 1 − U·u_max, exactly the endpoint pair."""
    u_max = 0.6
    (a_c, b_c, lam_c), rng_c = _mixup("consecutive", 9, u_max, SRC)
    (a_e, b_e, lam_e), rng_e = _mixup("endpoints", 9, u_max, SRC)
    assert rng_c.bit_generator.state == rng_e.bit_generator.state
    walks = random_walks(_toy_selection().graph, SRC, 4, np.random.default_rng(9), stop=STOP)
    usable = walks.reached & np.isin(walks.end, [4, 5])
    one_hop = walks.lengths[usable] == 1
    assert one_hop.any() and (~one_hop).any()
    assert np.array_equal(a_c[one_hop], a_e[one_hop]) and np.array_equal(b_c[one_hop], b_e[one_hop])
    np.testing.assert_allclose(lam_c[one_hop], lam_e[one_hop], rtol=1e-12, atol=1e-12)
    # on longer walks the endpoint λ keeps the source share ≥ 1 − u_max, consecutive need not
    assert ((lam_e >= 1.0 - u_max) & (lam_e <= 1.0)).all()
    assert not np.array_equal(b_c, b_e)


def test_no_usable_walk_gives_no_pairs():
    (pairs, _) = _mixup("endpoints", 0, 0.5, np.full(10, 3))  # source 3 only reaches the unselected t2
    assert pairs is None


def test_endpoint_mixing_in_a_fit_uses_the_same_walks(domains):
    """Walks depend on the graph and the generator only; the first mixing epoch (same graph, same
    generator state in both runs) mixes the same number of samples, with different pairs."""
    source, target = domains
    consecutive = Couple(BITS, config=tiny(epochs=2)).fit(source, target)
    endpoints = Couple(BITS, config=tiny(epochs=2, mix_pairs="endpoints")).fit(source, target)
    first_c, first_e = consecutive.diagnostics["epochs"][1], endpoints.diagnostics["epochs"][1]
    assert first_e["mixed_samples"] == first_c["mixed_samples"] > 0
    assert first_e["loss_mix_low"] != first_c["loss_mix_low"]
    assert without_timings(consecutive.diagnostics["epochs"][:1]) == without_timings(
        endpoints.diagnostics["epochs"][:1])


# ---------------------------------------------------------------------------------------- 6. high_mixup_detach
ONLY_HIGH_MIXUP = {"ce_weight": 0.0, "target_ce_weight": 0.0, "quant_weight": 0.0, "relation_weight": 0.0,
                   "mixup_low": False, "high_mixup_weight": 1.0, "weight_decay": 0.0, "lr": 1e-3, "epochs": 3}


def _initial_network(config: CoupleConfig) -> torch.nn.Module:
    """The network ``fit`` starts from (seed 0, 16-d, 3 classes), built independently."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Couple(BITS, seed=0, config=config)._build(16, 3)


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_zero_loss_weights_leave_the_weights_alone_during_warm_up(domains):
    """The premise of the next test: with every weight 0 (and weight_decay 0) Adam does not move."""
    source, target = domains
    config = tiny(**{**ONLY_HIGH_MIXUP, "epochs": 1})
    method = Couple(BITS, config=config).fit(source, target)
    assert _same(_parameters(method.network), _parameters(_initial_network(config)), "")


@pytest.mark.parametrize("detach", [True, False])
def test_high_mixup_gradient_reaches_the_encoder_only_without_detach(domains, detach):
    source, target = domains
    config = tiny(**ONLY_HIGH_MIXUP, high_mixup_detach=detach)
    method = Couple(BITS, config=config).fit(source, target)
    trained, initial = _parameters(method.network), _parameters(_initial_network(config))
    epochs = method.diagnostics["epochs"]
    assert all(r["loss_mix_high"] > 0 and r["mixed_samples"] > 0 for r in epochs[1:])
    for record in epochs:
        assert record["loss_total"] == pytest.approx(record["loss_mix_high"], rel=1e-5, abs=1e-7)
    assert _same(trained, initial, "hash_head."), "no loss reaches the hash head"
    assert not _same(trained, initial, "classifier."), "the high-level Mixup trains the classifier"
    if detach:
        assert _same(trained, initial, "encoder."), "detached features: the encoder must not move"
    else:
        assert not torch.equal(trained["encoder.0.weight"], initial["encoder.0.weight"])
        assert not torch.equal(trained["encoder.1.weight"], initial["encoder.1.weight"])


# ---------------------------------------------------------------------------------------- 7. ema_decay
def _ema_reference(raw_steps: list[list[torch.Tensor]], steps: int, decay: float) -> list[np.ndarray]:
    """EMA after ``steps`` optimiser steps, in float64: ``e₁ = w₁``, ``e_k = d e_{k−1} + (1 − d) w_k``."""
    ema = [t.double().numpy().copy() for t in raw_steps[0]]
    for k in range(1, steps):
        ema = [decay * e + (1 - decay) * w.double().numpy() for e, w in zip(ema, raw_steps[k], strict=True)]
    return ema


def _close(got: list[torch.Tensor], want: list[np.ndarray]) -> bool:
    return len(got) == len(want) and all(np.allclose(g.double().numpy(), w, rtol=1e-5, atol=1e-6)
                                         for g, w in zip(got, want, strict=True))


def test_refreshes_and_codes_use_an_independently_computed_ema(domains, refresh_spy, monkeypatch):
    source, target = domains
    decay = 0.6
    raw_steps: list[list[torch.Tensor]] = []
    training = {}
    original_epoch = Couple._train_epoch

    def train_epoch_spy(self, net, *args, **kwargs):
        training["net"] = net
        return original_epoch(self, net, *args, **kwargs)

    monkeypatch.setattr(Couple, "_train_epoch", train_epoch_spy)
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: raw_steps.append(
        float_tensors(training["net"])))
    try:
        method = Couple(BITS, config=tiny(ema_decay=decay)).fit(source, target)
    finally:
        handle.remove()
    steps = method.diagnostics["steps_per_epoch"]
    assert steps == 2 and len(raw_steps) == 4 * steps
    # the refreshes (after epochs 1, 2, 3) were handed the EMA of the weights so far, not the raw weights
    assert len(refresh_spy) == 3
    for done, call in zip((1, 2, 3), refresh_spy, strict=True):
        assert _close(call["weights"], _ema_reference(raw_steps, done * steps, decay))
        assert not _close(call["weights"], [t.double().numpy() for t in raw_steps[done * steps - 1]])
        assert call["net"] is not training["net"] and call["net"] is method.network
    # the final network is the EMA after all steps
    final = float_tensors(method.network)
    assert _close(final, _ema_reference(raw_steps, len(raw_steps), decay))
    assert not _close(final, [t.double().numpy() for t in raw_steps[-1]])
    # and its codes are the fitted method's codes, different from a run without EMA
    _, plain_real = fit_codes(source, target, tiny())
    assert not np.array_equal(np.sign(method.encode_real(target.features)), np.sign(plain_real))


@pytest.mark.parametrize("interrupt_at", [1, 2])
def test_interrupted_and_resumed_fit_with_ema_is_bit_identical(domains, tmp_path, interrupt_at):
    source, target = domains
    config = tiny(ema_decay=0.7)
    full, full_real = fit_codes(source, target, config, checkpoint_dir=tmp_path / "full")
    assert "ema" in read_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)

    first = Couple(BITS, seed=0, config=config)
    first.checkpoint_dir = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        first.fit(source, target, progress=stop_after(interrupt_at))
    payload = read_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    assert json.loads(payload["header"])["epochs_done"] == interrupt_at
    assert int(payload["ema"]["n_averaged"]) == interrupt_at * 2  # one update per optimiser step

    resumed = Couple(BITS, seed=0, config=config)
    resumed.checkpoint_dir, resumed.resume = tmp_path / "cut", True
    resumed.fit(source, target)
    assert resumed.diagnostics["resumed_from_epoch"] == interrupt_at
    assert np.array_equal(resumed.encode_real(target.features), full_real)
    assert without_timings(resumed.diagnostics["epochs"]) == without_timings(full.diagnostics["epochs"])
    for got, want in zip(resumed.selection_history, full.selection_history, strict=True):
        assert np.array_equal(got["selected"], want["selected"])
        assert np.array_equal(got["pseudo_labels"], want["pseudo_labels"])


def test_ema_checkpoints_are_checked_on_resume(domains, tmp_path):
    source, target = domains
    # a checkpoint without EMA is not resumed under an EMA configuration (and carries no EMA state)
    plain = Couple(BITS, config=tiny(epochs=2))
    plain.checkpoint_dir = tmp_path / "plain"
    plain.fit(source, target)
    assert "ema" not in read_checkpoint(tmp_path / "plain" / CHECKPOINT_NAME)
    method = Couple(BITS, config=tiny(epochs=2, ema_decay=0.5))
    method.checkpoint_dir, method.resume = tmp_path / "plain", True
    with pytest.raises(ConfigError, match="different configuration"):
        method.fit(source, target)
    # an EMA checkpoint that lost its EMA state is an inconsistent file, named in the error
    ema_run = Couple(BITS, config=tiny(epochs=2, ema_decay=0.5))
    ema_run.checkpoint_dir = tmp_path / "ema"
    with pytest.raises(KeyboardInterrupt):
        ema_run.fit(source, target, progress=stop_after(1))
    path = tmp_path / "ema" / CHECKPOINT_NAME
    shutil.copy(path, tmp_path / "intact.pt")
    payload = read_checkpoint(path)
    del payload["ema"]
    save_torch(path, payload, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    again = Couple(BITS, config=tiny(epochs=2, ema_decay=0.5))
    again.checkpoint_dir, again.resume = tmp_path / "ema", True
    with pytest.raises(FileFormatError, match="inconsistent") as info:
        again.fit(source, target)
    assert str(path) in str(info.value)
    # the intact one resumes and matches an uninterrupted run
    shutil.copy(tmp_path / "intact.pt", path)
    again = Couple(BITS, config=tiny(epochs=2, ema_decay=0.5))
    again.checkpoint_dir, again.resume = tmp_path / "ema", True
    again.fit(source, target)
    _, full_real = fit_codes(source, target, tiny(epochs=2, ema_decay=0.5))
    assert again.diagnostics["resumed_from_epoch"] == 1
    assert np.array_equal(again.encode_real(target.features), full_real)


def test_save_load_round_trip_with_ema(domains, tmp_path):
    source, target = domains
    method = Couple(BITS, seed=2, config=tiny(ema_decay=0.9)).fit(source, target)
    path = method.save(tmp_path / "model.pt")
    queries = np.random.default_rng(4).normal(size=(25, 16)).astype(np.float32)
    loaded = load_method(path)
    assert isinstance(loaded, Couple) and loaded.config == method.config
    assert set(loaded.network.state_dict()) == set(method.network.state_dict())
    assert not any(k.startswith("module.") or k == "n_averaged" for k in loaded.network.state_dict())
    assert all(torch.equal(v, loaded.network.state_dict()[k]) for k, v in method.network.state_dict().items())
    assert np.array_equal(loaded.encode(queries), method.encode(queries))
    assert np.array_equal(loaded.encode_real(target.features), method.encode_real(target.features))
    assert np.array_equal(loaded.predict(target.features), method.predict(target.features))
    # the fitted method is deterministic with EMA too
    again = Couple(BITS, seed=2, config=tiny(ema_decay=0.9)).fit(source, target)
    assert np.array_equal(copy.deepcopy(again).encode_real(target.features), method.encode_real(target.features))


# ---------------------------------------------------------------------------------------- graph_features=both
def test_both_graph_features_are_the_unit_input_beside_the_unit_encoder_features(domains, monkeypatch):
    """At the first refresh (training before it does not depend on the graph) the ``both`` graph is built
    on ``[x/|x|, f/|f|]``: ``x`` the normalised inputs, ``f`` the features the ``encoder`` run's graph used."""
    source, target = domains
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    original = couple_selection.build_cross_domain_graph

    def spy(source_features, source_labels, target_features, **kwargs):
        seen.append((np.array(source_features), np.array(target_features)))
        return original(source_features, source_labels, target_features, **kwargs)

    monkeypatch.setattr(couple_selection, "build_cross_domain_graph", spy)
    fit_codes(source, target, tiny(epochs=2))
    encoder_input = np.concatenate(seen[0])
    seen.clear()
    both_run, _ = fit_codes(source, target, tiny(epochs=2, graph_features="both"))
    both_input = np.concatenate(seen[0])

    x = np.concatenate([both_run.source_normalizer.transform(source.features),  # each domain on its own mean
                        both_run.normalizer.transform(target.features)])
    width = x.shape[1]
    assert both_input.shape == (x.shape[0], width + encoder_input.shape[1])
    np.testing.assert_allclose(both_input[:, :width], x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
    f = encoder_input.astype(np.float64)
    np.testing.assert_allclose(both_input[:, width:], f / np.linalg.norm(f, axis=1, keepdims=True), atol=1e-6)
    # so the cosine of two nodes is the mean of their input and encoder cosines
    both_cos = both_input @ both_input.T / 2
    in_cos = both_input[:, :width] @ both_input[:, :width].T
    enc_cos = both_input[:, width:] @ both_input[:, width:].T
    np.testing.assert_allclose(both_cos, (in_cos + enc_cos) / 2, atol=1e-6)
    assert not np.allclose(in_cos, enc_cos, atol=1e-2)  # the two halves really differ
