"""GCKD trainer (crossret.textimage.gckd): config, LR schedule, MLM distillation, the loss of one step,
EMA teacher, memory enqueue, cross-domain ITM pseudo-pairs, determinism, checkpoints and resume."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossret.errors import ConfigError, DataError, FileFormatError
from crossret.storage.sealed import save_torch
from crossret.textimage.albef import AlbefConfig, AlbefModel
from crossret.textimage.feature_heads import FeatureHeadsConfig, FeatureHeadsModel
from crossret.textimage.gckd import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    GckdConfig,
    GckdTrainer,
    _lr_factor,
    mlm_distill_loss,
    read_checkpoint,
)
from crossret.textimage.streams import FeatureTrainingData, StepBatch
from crossret.textimage.tokenize import mask_tokens

IMAGE_DIM, TEXT_DIM, EMBED_DIM = 12, 9, 16
P, K, TB = 2, 2, 4  # source ids per batch, pairs per id, target batch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny models: one intra-op thread is much faster (and steadier) than two on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0, **overrides: Any) -> FeatureHeadsModel:
    """A fresh feature-heads model; the global RNG is seeded first, so the trainer built right after it
    (whose GNN is initialised from the global RNG) is reproducible as well."""
    torch.manual_seed(seed)
    return FeatureHeadsModel(FeatureHeadsConfig(image_dim=IMAGE_DIM, text_dim=TEXT_DIM, embed_dim=EMBED_DIM,
                                                hidden_dim=32, fusion_dim=16, **overrides))


def _config(**overrides: Any) -> GckdConfig:
    values: dict[str, Any] = dict(epochs=1, ids_per_batch=P, pairs_per_id=K, target_batch=TB, memory_size=16,
                                  knn_k=3, warmup_epochs=0.5)
    values.update(overrides)
    return GckdConfig.from_dict(values)


def _data(*, n_ids: int = 6, per_id: int = 3, n_ti: int = 10, n_tt: int = 14, target: bool = True, seed: int = 0,
          truth: tuple[np.ndarray, np.ndarray] | None = None, pairing: str = "unpaired") -> FeatureTrainingData:
    rng = np.random.default_rng(100 + seed)
    n = n_ids * per_id
    kwargs: dict[str, Any] = {}
    if target:
        kwargs = dict(target_image=rng.normal(size=(n_ti, IMAGE_DIM)), target_text=rng.normal(size=(n_tt, TEXT_DIM)),
                      target_truth_ids=truth)
    return FeatureTrainingData(rng.normal(size=(n, IMAGE_DIM)), rng.normal(size=(n, TEXT_DIM)),
                               np.repeat(np.arange(n_ids), per_id), ids_per_batch=P, pairs_per_id=K, target_batch=TB,
                               seed=seed, target_pairing=pairing, **kwargs)


def _one_step_data(**kwargs: Any) -> FeatureTrainingData:
    """P identities × K pairs and TB target items: exactly one step per epoch."""
    return _data(n_ids=P, per_id=K, n_ti=TB, n_tt=TB, **kwargs)


def _first_batch(data: FeatureTrainingData) -> StepBatch:
    return next(iter(data.batches(0)))


def _state(trainer: GckdTrainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()})
    out.update({f"gnn.{k}": v for k, v in trainer.gnn.state_dict().items()})
    if trainer.memory is not None:
        out.update({f"memory.{k}": v for k, v in trainer.memory.state_dict().items()})
    return out


def _assert_states_equal(a: GckdTrainer, b: GckdTrainer) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ: {different[:5]}"


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults() -> None:
    c = GckdConfig()
    assert c.momentum == 0.999 and c.knn_k == 10 and c.memory_size == 4096 and c.delta == 0.5
    assert c.delta_on == "probability" and c.target_pairing == "unpaired" and c.alpha == 0.4
    assert all(getattr(c, f"{t}_weight") == 1.0 for t in ("itc", "itm", "mlm", "prop", "kd", "cd_itm"))
    assert c.adapts
    assert c.validate() is c


def test_source_only_turns_off_target_terms() -> None:
    c = GckdConfig.source_only()
    assert (c.prop_weight, c.kd_weight, c.cd_itm_weight) == (0.0, 0.0, 0.0)
    assert (c.itc_weight, c.itm_weight, c.mlm_weight) == (1.0, 1.0, 1.0)
    assert not c.adapts
    c2 = GckdConfig.source_only(epochs=3, lr=2e-5)
    assert c2.epochs == 3 and c2.lr == 2e-5 and not c2.adapts
    # an override can switch a target term back on
    assert GckdConfig.source_only(kd_weight=0.5).adapts
    with pytest.raises(ConfigError, match="epochs"):
        GckdConfig.source_only(epochs=0)
    for name in ("prop_weight", "kd_weight", "cd_itm_weight"):
        assert GckdConfig.from_dict({name: 0.0}).adapts  # the two others are still on
    assert not GckdConfig.from_dict({"prop_weight": 0, "kd_weight": 0, "cd_itm_weight": 0}).adapts


def test_config_dict_round_trip() -> None:
    c = GckdConfig(epochs=7, lr=3e-5, grad_clip=1.5, kd_min_confidence=0.3, delta=0.2, delta_on="cosine",
                   target_pairing="paired", gnn="sage", use_gnn=False, memory_size=0, seed=11, amp="off")
    d = c.to_dict()
    assert d["epochs"] == 7 and d["gnn"] == "sage" and d["grad_clip"] == 1.5
    assert set(d) == {f.name for f in dataclasses.fields(GckdConfig)}
    back = GckdConfig.from_dict(d)
    assert back == c and back.to_dict() == d
    assert GckdConfig.from_dict(GckdConfig().to_dict()) == GckdConfig()


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) bogus, momentumm"):
        GckdConfig.from_dict({"momentumm": 0.9, "bogus": 1, "epochs": 2})


INVALID_VALUES = [
    ("epochs", 0), ("epochs", -2), ("epochs", 1.5), ("epochs", "3"), ("epochs", None),
    ("ids_per_batch", 0), ("pairs_per_id", -1), ("target_batch", 0), ("knn_k", 0), ("knn_k", 2.0),
    ("memory_size", -1), ("memory_size", 8.0),
    ("lr", 0.0), ("lr", -1e-5), ("lr", math.nan), ("lr", math.inf), ("head_lr", 0), ("head_lr", math.nan),
    ("weight_decay", -0.1), ("weight_decay", math.nan), ("weight_decay", "x"), ("warmup_epochs", -1),
    ("min_lr", -1e-6), ("min_lr", math.inf),
    ("itc_weight", -1), ("itm_weight", math.nan), ("mlm_weight", math.inf), ("prop_weight", -0.5),
    ("kd_weight", "1"), ("cd_itm_weight", None),
    ("alpha", -0.1), ("alpha", 1.1), ("alpha", math.nan), ("momentum", 1.5), ("momentum", -0.001),
    ("mlm_prob", 2), ("gnn_dropout", 1.0), ("gnn_dropout", -0.1),
    ("gnn", "gat"), ("delta_on", "prob"), ("delta", 1.5), ("delta", -1.01), ("delta", math.nan),
    ("target_pairing", "both"), ("amp", "fp16"),
    ("grad_clip", 0), ("grad_clip", -1.0), ("grad_clip", math.nan), ("seed", -1), ("seed", 1.5),
]


@pytest.mark.parametrize(("key", "value"), INVALID_VALUES, ids=[f"{k}={v!r}" for k, v in INVALID_VALUES])
def test_config_rejects_invalid_value(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"GCKD config: {key}="):
        GckdConfig.from_dict({key: value})


# Values of the wrong type (or never checked) that validate() lets through or turns into a raw
# TypeError/ValueError whose message does not name the key (see the report of this test file).
UNCHECKED_VALUES = [
    ("lr", "1e-5"), ("lr", None), ("head_lr", "x"), ("grad_clip", "1"),
    ("alpha", "x"), ("momentum", None), ("delta", "x"),
    ("kd_min_confidence", "high"), ("kd_min_confidence", 1.5), ("kd_min_confidence", math.nan),
    ("use_gnn", "no"), ("epochs", True), ("seed", True),
]


@pytest.mark.parametrize(("key", "value"), UNCHECKED_VALUES, ids=[f"{k}={v!r}" for k, v in UNCHECKED_VALUES])
def test_config_rejects_wrongly_typed_value(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"GCKD config: {key}="):
        GckdConfig.from_dict({key: value})


def test_trainer_validates_its_config() -> None:
    c = GckdConfig()
    c.knn_k = 0  # mutated after construction: the trainer validates again
    with pytest.raises(ConfigError, match="knn_k"):
        GckdTrainer(_model(), c)


# ------------------------------------------------------------------------------------------------ LR schedule


@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.25), (1, 0.5), (3, 1.0),  # linear warm-up over 4 steps
    (4, 1.0),  # cosine starts at 1
    (12, 0.1 + 0.9 * 0.5),  # half-way: cos(π/2) = 0
    (8, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    (20, 0.1), (27, 0.1),  # the end and beyond: the floor
])
def test_lr_factor_values(step: int, expected: float) -> None:
    assert _lr_factor(step, 20, 4, 0.1) == pytest.approx(expected, abs=1e-12)


def test_lr_factor_without_warmup_and_degenerate_total() -> None:
    assert _lr_factor(0, 10, 0, 0.0) == 1.0
    assert _lr_factor(5, 10, 0, 0.0) == pytest.approx(0.5)
    assert _lr_factor(10, 10, 0, 0.0) == pytest.approx(0.0, abs=1e-12)
    # warm-up as long as training: no division by zero after it
    assert _lr_factor(3, 3, 3, 0.2) == pytest.approx(1.0)
    factors = [_lr_factor(s, 50, 5, 0.01) for s in range(50)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))  # non-increasing after warm-up
    assert min(factors) >= 0.01


def test_fit_sets_the_scheduled_lr_on_every_group() -> None:
    data = _data()
    config = _config(epochs=2, lr=2e-4, head_lr=1e-3, min_lr=2e-5, warmup_epochs=0.5)
    trainer = GckdTrainer(_model(), config)
    steps = data.steps_per_epoch()
    total, warmup = 2 * steps, round(0.5 * steps)
    seen: list[tuple[int, list[float]]] = []
    trainer.fit(data, progress=lambda step, tot, stats: seen.append(
        (step, [g["lr"] for g in trainer.optimizer.param_groups])))
    assert [s for s, _ in seen] == list(range(1, total + 1))
    for step, lrs in seen:
        factor = _lr_factor(step - 1, total, warmup, 2e-5 / 2e-4)
        assert lrs == pytest.approx([2e-4 * factor, 2e-4 * factor, 1e-3 * factor], rel=1e-12)


# ------------------------------------------------------------------------------------------------ MLM loss


def _manual_mlm(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, alpha: float
                ) -> torch.Tensor:
    rows, cols = torch.nonzero(labels != -100, as_tuple=True)
    logp = torch.log_softmax(logits[rows, cols].double(), dim=-1)
    ce = -logp[torch.arange(rows.numel()), labels[rows, cols]].mean()
    if teacher is None or alpha == 0:
        return ce
    q = torch.softmax(teacher[rows, cols].double(), dim=-1)
    soft = -(q * logp).sum(dim=-1).mean()
    return (1 - alpha) * ce + alpha * soft


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_mlm_distill_loss_matches_manual(alpha: float, with_teacher: bool) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=g)
    teacher = torch.randn(3, 5, 11, generator=g) * 2 if with_teacher else None
    labels = torch.full((3, 5), -100)
    labels[0, 1], labels[1, 4], labels[2, 0], labels[2, 3] = 7, 0, 10, 7
    got = mlm_distill_loss(logits, labels, teacher, alpha)
    expected = _manual_mlm(logits, labels, teacher, alpha)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # masked CE equals torch's ignore_index CE when there is no teacher term
    if teacher is None or alpha == 0:
        ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
        assert float(got) == pytest.approx(float(ref), rel=1e-6)


def test_mlm_distill_loss_soft_part_is_cross_entropy_with_teacher_softmax() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 6, generator=g)
    labels = torch.tensor([[-100, 2, -100, -100], [5, -100, -100, 1]])
    # a teacher equal to the student: the soft term is the entropy of the student's own distribution
    got = mlm_distill_loss(logits, labels, logits.clone(), 1.0)
    p = torch.softmax(logits[labels != -100], dim=-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert float(got) == pytest.approx(float(entropy), rel=1e-5)


def test_mlm_distill_loss_without_masked_positions_is_zero_and_connected() -> None:
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), -100)
    loss = mlm_distill_loss(logits, labels, torch.randn(2, 3, 5), 0.4)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


# ------------------------------------------------------------------------------------------------ one step


def test_total_loss_is_weighted_sum_of_terms() -> None:
    weights = dict(itc_weight=0.7, itm_weight=1.3, prop_weight=0.5, kd_weight=2.0, cd_itm_weight=0.25)
    config = _config(delta=0.0, **weights)  # δ = 0: every target text gets a pseudo-positive
    trainer = GckdTrainer(_model(), config)
    batch = _first_batch(_data())
    total, stats = trainer.losses(batch)
    terms = {"itc", "itm", "prop", "kd", "cd_itm"}
    assert terms <= set(stats) and "mlm" not in stats  # feature heads: no MLM
    assert stats["pseudo_pairs"] == TB
    assert total.ndim == 0 and total.requires_grad
    expected = sum(weights[f"{t}_weight"] * stats[t] for t in terms)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert all(math.isfinite(stats[t]) and stats[t] > 0 for t in terms)


@pytest.mark.parametrize("term", ["itm", "prop", "kd", "cd_itm", "itc"])
def test_zero_weight_removes_the_term(term: str) -> None:
    config = _config(delta=0.0, **{f"{term}_weight": 0.0})
    trainer = GckdTrainer(_model(), config)
    total, stats = trainer.losses(_first_batch(_data()))
    assert term not in stats
    others = {"itc", "itm", "prop", "kd", "cd_itm"} - {term}
    assert others <= set(stats)
    assert float(total.detach()) == pytest.approx(sum(stats[t] for t in others), rel=1e-5)


def test_source_only_without_target_batch() -> None:
    trainer = GckdTrainer(_model(), _config(prop_weight=0, kd_weight=0, cd_itm_weight=0))
    batch = _first_batch(_data(target=False))
    assert batch.target_images is None
    total, stats = trainer.losses(batch)
    assert set(stats) == {"itc", "itm"}
    assert float(total.detach()) == pytest.approx(stats["itc"] + stats["itm"], rel=1e-6)


def test_target_config_without_target_batch_raises() -> None:
    trainer = GckdTrainer(_model(), _config())
    with pytest.raises(DataError, match="no target data"):
        trainer.losses(_first_batch(_data(target=False)))
    with pytest.raises(DataError, match="needs target data"):
        trainer.fit(_data(target=False))


def test_ema_teacher_update() -> None:
    m = 0.9
    trainer = GckdTrainer(_model(), _config(momentum=m))
    batch = _first_batch(_data())
    trainer.fit(_one_step_data())  # student and teacher now differ
    old_teacher = {k: v.clone() for k, v in trainer.teacher.named_parameters()}
    student = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    assert any(not torch.equal(old_teacher[k], student[k]) for k in student)
    trainer.losses(batch)
    for name, param in trainer.teacher.named_parameters():
        expected = m * old_teacher[name] + (1 - m) * student[name]
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)
        assert not param.requires_grad
    # the student itself is not touched by losses()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, student[name])


def test_teacher_starts_as_copy_and_runs_in_eval_mode() -> None:
    trainer = GckdTrainer(_model(), _config())
    for (n1, p1), (n2, p2) in zip(trainer.model.named_parameters(), trainer.teacher.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert not trainer.teacher.training
    trainer.fit(_one_step_data())
    assert not trainer.teacher.training and trainer.model.training


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("adapt", [True, False])
def test_memory_holds_the_teacher_features_of_the_step(adapt: bool) -> None:
    data = _one_step_data(target=adapt)
    assert data.steps_per_epoch() == 1
    # no warm start: the banks then hold this step's features only
    config = _config(warm_start_banks=False) if adapt else _config(prop_weight=0, kd_weight=0, cd_itm_weight=0)
    trainer = GckdTrainer(_model(), config)
    trainer.fit(data)
    assert trainer.step == 1
    batch = _first_batch(data)
    teacher = trainer.teacher
    assert not teacher.training  # dropout off: its features are reproducible
    with torch.no_grad():
        _, tf_vs = teacher.encode_image(batch.source_images)
        _, tf_ts = teacher.encode_text(batch.source_text)
    mem = trainer.memory
    assert mem is not None
    for modality, expected in (("image", tf_vs), ("text", tf_ts)):
        bank = mem.bank("source", modality)
        assert len(bank) == P * K
        torch.testing.assert_close(bank.features(), expected, rtol=0, atol=1e-6)
        assert torch.equal(bank.ids(), batch.source_ids)
        assert bank.domains().tolist() == [0] * (P * K)
    if adapt:
        assert batch.target_images is not None and batch.target_text is not None
        with torch.no_grad():
            _, tf_vt = teacher.encode_image(batch.target_images)
            _, tf_tt = teacher.encode_text(batch.target_text)
        for modality, expected in (("image", tf_vt), ("text", tf_tt)):
            bank = mem.bank("target", modality)
            assert len(bank) == TB
            torch.testing.assert_close(bank.features(), expected, rtol=0, atol=1e-6)
            assert bank.ids().tolist() == [-1] * TB
            assert bank.domains().tolist() == [1] * TB
        assert torch.equal(mem.target_image.indices(), batch.target_image_index)
        assert torch.equal(mem.target_text.indices(), batch.target_text_index)
    else:
        assert len(mem.bank("target", "image")) == 0 and len(mem.bank("target", "text")) == 0


def test_memory_fills_fifo_over_steps() -> None:
    data = _data()
    trainer = GckdTrainer(_model(), _config(memory_size=6))
    trainer.fit(data)
    steps = data.steps_per_epoch()
    mem = trainer.memory
    assert mem is not None and steps * P * K > 6
    for domain, modality in mem.ORDER:
        bank = mem.bank(domain, modality)
        assert bank.is_full and len(bank) == 6
        torch.testing.assert_close(bank.features().norm(dim=1), torch.ones(6))
    # the last rows of the source id bank are the ids of the last batch
    last = list(data.batches(0))[-1]
    assert mem.bank("source", "image").ids()[-P * K:].tolist() == last.source_ids.tolist()


def test_memory_size_zero() -> None:
    trainer = GckdTrainer(_model(), _config(memory_size=0, epochs=2))
    assert trainer.memory is None
    result = trainer.fit(_data())
    assert trainer.memory is None
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert {"itc", "itm", "prop", "kd", "pseudo_pairs"} <= set(result.history[-1])


# ------------------------------------------------------------------------------------------------ cross-domain ITM


def _capture_first_stats(trainer: GckdTrainer, data: FeatureTrainingData) -> dict[str, float]:
    seen: list[dict[str, float]] = []
    trainer.fit(data, progress=lambda step, total, stats: seen.append(dict(stats)))
    return seen[0]


@pytest.mark.parametrize("use_gnn", [True, False])
def test_cosine_delta_minus_one_selects_every_target_text(use_gnn: bool) -> None:
    trainer = GckdTrainer(_model(), _config(delta_on="cosine", delta=-1.0, use_gnn=use_gnn))
    _, stats = trainer.losses(_first_batch(_data()))
    assert stats["pseudo_pairs"] == TB
    assert "cd_itm" in stats and math.isfinite(stats["cd_itm"])


def test_probability_delta_zero_selects_every_target_text() -> None:
    trainer = GckdTrainer(_model(), _config(delta=0.0))
    _, stats = trainer.losses(_first_batch(_data()))
    assert stats["pseudo_pairs"] == TB and "cd_itm" in stats


def test_probability_delta_one_selects_nothing() -> None:
    # τ = 0.5 keeps the teacher's batch probabilities well below 1
    trainer = GckdTrainer(_model(temp=0.5), _config(delta=1.0))
    total, stats = trainer.losses(_first_batch(_data()))
    assert stats["pseudo_pairs"] == 0
    assert "cd_itm" not in stats and "pseudo_pair_precision" not in stats
    assert float(total.detach()) == pytest.approx(stats["itc"] + stats["itm"] + stats["prop"] + stats["kd"], rel=1e-5)


def _teacher_batch_similarity(trainer: GckdTrainer, batch: StepBatch) -> torch.Tensor:
    assert batch.target_images is not None and batch.target_text is not None
    with torch.no_grad():
        _, tf_vt = trainer.teacher.encode_image(batch.target_images)
        _, tf_tt = trainer.teacher.encode_text(batch.target_text)
    return tf_tt @ tf_vt.T  # (texts, images)


def test_probability_threshold_against_hand_computation() -> None:
    """Without the GNN the teacher score is softmax(f'_t f'_vᵀ / τ) over the batch images; with δ between two
    of the row maxima exactly the rows above δ become pseudo-pairs."""
    data = _one_step_data()
    batch = _first_batch(data)
    probe = GckdTrainer(_model(temp=0.2), _config(use_gnn=False, delta=0.0))
    probe.losses(batch)  # the same teacher state as the first step of the real run below
    best = torch.softmax(_teacher_batch_similarity(probe, batch) / 0.2, dim=1).max(dim=1).values.sort().values
    assert float(best[-1] - best[0]) > 1e-3, "need distinct row maxima for this case"
    gaps = best[1:] - best[:-1]
    i = int(gaps.argmax())
    delta = float((best[i] + best[i + 1]) / 2)
    expected = int((best >= delta).sum())
    assert 0 < expected < TB
    trainer = GckdTrainer(_model(temp=0.2), _config(use_gnn=False, delta=delta))
    stats = _capture_first_stats(trainer, data)
    assert stats["pseudo_pairs"] == expected


def test_pseudo_pair_precision_against_hand_computation() -> None:
    img_truth = np.array([10, 11, 10, 11], dtype=np.int64)
    txt_truth = np.array([10, 10, 11, 12], dtype=np.int64)
    data = _one_step_data(truth=(img_truth, txt_truth))
    trainer = GckdTrainer(_model(), _config(use_gnn=False, delta_on="cosine", delta=-1.0))
    stats = _capture_first_stats(trainer, data)
    # after one fit step the teacher is the one that scored the step (the EMA runs at the start of a step)
    batch = _first_batch(data)
    best_image = _teacher_batch_similarity(trainer, batch).argmax(dim=1).numpy()
    assert batch.target_image_index is not None and batch.target_text_index is not None
    ti = batch.target_image_index.numpy()[best_image]
    tt = batch.target_text_index.numpy()
    expected = float(np.mean(img_truth[ti] == txt_truth[tt]))
    assert stats["pseudo_pairs"] == TB
    assert 0.0 <= stats["pseudo_pair_precision"] <= 1.0
    assert stats["pseudo_pair_precision"] == pytest.approx(expected)


def test_pseudo_pair_precision_with_gnn_in_range_and_absent_without_truth() -> None:
    truth = (np.arange(10) % 3, np.arange(14) % 3)
    trainer = GckdTrainer(_model(), _config(delta=0.0, epochs=1))
    result = trainer.fit(_data(truth=truth))
    assert 0.0 <= result.history[0]["pseudo_pair_precision"] <= 1.0
    result = GckdTrainer(_model(), _config(delta=0.0)).fit(_data())
    assert "pseudo_pair_precision" not in result.history[0] and result.history[0]["pseudo_pairs"] == TB


def test_paired_target_pairing_trains() -> None:
    data = _data(n_ti=10, n_tt=10, pairing="paired", truth=(np.arange(10), np.arange(10)))
    result = GckdTrainer(_model(), _config(target_pairing="paired", delta=0.0)).fit(data)
    assert math.isfinite(result.history[0]["loss"]) and "kd" in result.history[0]


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_history_and_parameters() -> None:
    data = _data()
    runs = []
    for _ in range(2):
        trainer = GckdTrainer(_model(), _config(epochs=2, seed=5))
        result = trainer.fit(data)
        runs.append((trainer, result.history))
    assert runs[0][1] == runs[1][1]
    assert [h["epoch"] for h in runs[0][1]] == [1, 2]
    _assert_states_equal(runs[0][0], runs[1][0])
    # and training did change the model
    assert not torch.equal(runs[0][0].model.itm_head.weight, _model().itm_head.weight)


def test_config_seed_alone_determines_training() -> None:
    data = _data()
    model = _model()
    twin = copy.deepcopy(model)
    h1 = GckdTrainer(model, _config(epochs=1, seed=5)).fit(data).history
    h2 = GckdTrainer(twin, _config(epochs=1, seed=5)).fit(data).history
    assert h1 == h2


def test_different_seed_changes_training() -> None:
    data = _data()
    h1 = GckdTrainer(_model(), _config(seed=1)).fit(data).history
    h2 = GckdTrainer(_model(), _config(seed=2)).fit(data).history
    assert h1 != h2


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    trainer = GckdTrainer(_model(), _config(epochs=1), checkpoint_dir=directory)
    trainer.fit(_data())
    return directory / "checkpoint.pt"


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    data = _data()
    config = _config(epochs=2)
    full = GckdTrainer(_model(), config, checkpoint_dir=tmp_path / "A")
    full_result = full.fit(data)
    assert [h["epoch"] for h in full_result.history] == [1, 2]

    first = GckdTrainer(_model(), config, checkpoint_dir=tmp_path / "B")
    calls: list[int] = []
    part = first.fit(data, should_stop=lambda: calls.append(1) or True)
    assert [h["epoch"] for h in part.history] == [1] and calls == [1]
    state = read_checkpoint(tmp_path / "B" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == data.steps_per_epoch()

    model = _model()
    torch.manual_seed(999)  # another GNN init and global RNG state: the checkpoint must restore both
    second = GckdTrainer(model, config, checkpoint_dir=tmp_path / "B")
    resumed = second.fit(data, resume=True)
    assert resumed.resumed_from_epoch == 1
    assert resumed.history == full_result.history
    assert second.step == full.step == 2 * data.steps_per_epoch()
    _assert_states_equal(full, second)
    opt_full, opt_second = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert opt_full.keys() == opt_second.keys()
    for index, slots in opt_full.items():
        assert all(torch.equal(value, opt_second[index][name]) for name, value in slots.items())
    # both directories hold the final checkpoint only: no temporary files left behind
    for d in ("A", "B"):
        assert sorted(p.name for p in (tmp_path / d).iterdir()) == ["checkpoint.pt"]
    assert read_checkpoint(tmp_path / "B" / "checkpoint.pt")["epoch"] == 2


def test_resume_finished_run_does_nothing(tmp_path: Path) -> None:
    data = _data()
    trainer = GckdTrainer(_model(), _config(), checkpoint_dir=tmp_path)
    history = trainer.fit(data).history
    again = GckdTrainer(_model(), _config(), checkpoint_dir=tmp_path)
    result = again.fit(data, resume=True)
    assert result.resumed_from_epoch == 1 and result.history == history
    _assert_states_equal(trainer, again)


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    trainer = GckdTrainer(_model(), _config(), checkpoint_dir=tmp_path / "new")
    result = trainer.fit(_data(), resume=True)
    assert result.resumed_from_epoch == 0 and len(result.history) == 1
    with pytest.raises(ConfigError, match="checkpoint directory"):
        GckdTrainer(_model(), _config()).fit(_data(), resume=True)


@pytest.mark.parametrize("change", ["config", "data", "model"])
def test_resume_with_different_settings_raises(tmp_path: Path, change: str) -> None:
    GckdTrainer(_model(), _config(epochs=2), checkpoint_dir=tmp_path).fit(_data(), should_stop=lambda: True)
    config, data, model = _config(epochs=2), _data(), _model()
    if change == "config":
        config = _config(epochs=2, lr=3e-5)
    elif change == "data":
        data = _data(seed=1)
    else:
        model = _model(dropout=0.2)
    trainer = GckdTrainer(model, config, checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="different configuration") as info:
        trainer.fit(data, resume=True)
    assert str(tmp_path / "checkpoint.pt") in str(info.value)


def test_checkpoint_contents(trained_checkpoint: Path) -> None:
    state = read_checkpoint(trained_checkpoint)
    assert state["format"] == CHECKPOINT_FORMAT and state["version"] == 1 and state["epoch"] == 1
    assert {"model", "teacher", "gnn", "memory", "optimizer", "generator", "torch_rng", "history",
            "fingerprint"} <= set(state)
    assert state["fingerprint"]["config"] == _config(epochs=1).to_dict()
    assert state["fingerprint"]["model"] == "FeatureHeadsModel"
    assert [p.name for p in trained_checkpoint.parent.iterdir()] == ["checkpoint.pt"]


def _corrupt(kind: str, good: Path, path: Path) -> None:
    raw = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "version":
        state = read_checkpoint(good)
        state["version"] = 99
        save_torch(path, state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    elif kind == "altered":  # one flipped bit in the middle fails the sealed container's SHA-256
        middle = len(raw) // 2
        path.write_bytes(raw[:middle] + bytes([raw[middle] ^ 4]) + raw[middle + 1:])
    elif kind == "other_kind":  # a sealed file of another kind (a COUPLE checkpoint's container)
        save_torch(path, read_checkpoint(good), "crossret.couple.checkpoint", 1)
    elif kind == "pickle":
        torch.save({"format": CHECKPOINT_FORMAT, "obj": _Opaque()}, path)
    else:  # pragma: no cover
        raise AssertionError(kind)


class _Opaque:
    """Not loadable with weights_only=True."""


CORRUPTIONS = ["truncated", "random", "empty", "foreign", "tensor", "version", "pickle", "altered", "other_kind"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_read_checkpoint_rejects_corrupt_files(kind: str, trained_checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _corrupt(kind, trained_checkpoint, path)
    with pytest.raises(FileFormatError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    if kind == "version":
        assert "version 99" in str(info.value)
    if kind in ("foreign", "tensor"):  # bare torch.save files (the pre-container layout) are parsed, then refused
        assert "not a crossret GCKD checkpoint" in str(info.value)
    expected = {"truncated": "truncated", "altered": "checksum mismatch", "other_kind": "not a GCKD checkpoint"}
    if kind in expected:
        assert expected[kind] in str(info.value)


@pytest.mark.parametrize("kind", ["truncated", "random", "foreign"])
def test_resume_rejects_corrupt_checkpoint(kind: str, trained_checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _corrupt(kind, trained_checkpoint, path)
    trainer = GckdTrainer(_model(), _config(epochs=2), checkpoint_dir=tmp_path)
    with pytest.raises(FileFormatError, match="checkpoint") as info:
        trainer.fit(_data(), resume=True)
    assert str(path) in str(info.value)


def test_resume_rejects_inconsistent_state(trained_checkpoint: Path, tmp_path: Path) -> None:
    state = read_checkpoint(trained_checkpoint)
    del state["model"]["itm_head.weight"]
    path = tmp_path / "checkpoint.pt"
    save_torch(path, state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    trainer = GckdTrainer(_model(), _config(epochs=1), checkpoint_dir=tmp_path)
    with pytest.raises(FileFormatError, match="inconsistent") as info:
        trainer.fit(_data(), resume=True)
    assert str(path) in str(info.value)


def test_failed_checkpoint_write_leaves_old_file(trained_checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    good = trained_checkpoint.read_bytes()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(good)
    trainer = GckdTrainer(_model(), _config(epochs=1), checkpoint_dir=tmp_path)

    def boom(src: Any, dst: Any) -> None:
        assert Path(src).read_bytes().startswith(b"CRSEALED")  # the new checkpoint went to a temporary file
        raise OSError("disk full")

    monkeypatch.setattr("crossret.storage.atomic.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(_data())
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# ------------------------------------------------------------------------------------------------ ALBEF + MLM


def _albef_batch(seed: int = 0) -> StepBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (4, 7), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = 0  # [PAD]
    return StepBatch(torch.randn(4, 3, 32, 16, generator=g), ids, mask, torch.tensor([0, 0, 1, 1]))


MaskFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _mask_fn(prob: float) -> MaskFn:
    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(input_ids, vocab_size=100, mask_token_id=4, special_ids=[0, 1, 2, 3, 4],
                           attention_mask=attention_mask, mask_prob=prob, generator=generator)
    return fn


def test_albef_mlm_term_matches_manual() -> None:
    torch.manual_seed(0)
    model = AlbefModel(AlbefConfig.tiny(text_dropout=0.0))
    config = GckdConfig.source_only(itm_weight=0.0, memory_size=0, mlm_prob=0.5, alpha=0.4)
    trainer = GckdTrainer(model, config, mask_fn=_mask_fn(0.5))
    batch = _albef_batch()
    total, stats = trainer.losses(batch)
    assert set(stats) == {"itc", "mlm"}
    assert float(total.detach()) == pytest.approx(stats["itc"] + stats["mlm"], rel=1e-5)
    # the masking is the first draw of the trainer's generator (seeded by config.seed) when ITM is off
    masked, labels = _mask_fn(0.5)(batch.source_text, batch.source_mask, torch.Generator().manual_seed(0))
    assert (labels != -100).any()
    with torch.no_grad():
        s_tok, _ = trainer.model.encode_image(batch.source_images)
        t_tok, _ = trainer.teacher.encode_image(batch.source_images)
        logits = trainer.model.mlm_logits(masked, batch.source_mask, s_tok)
        t_logits = trainer.teacher.mlm_logits(masked, batch.source_mask, t_tok)
    expected = _manual_mlm(logits, labels, t_logits, 0.4)
    assert stats["mlm"] == pytest.approx(float(expected), rel=1e-4)


def test_albef_fit_with_tokens_produces_mlm_and_no_mlm_when_off() -> None:
    torch.manual_seed(0)
    model = AlbefModel(AlbefConfig.tiny())
    trainer = GckdTrainer(model, GckdConfig.source_only(memory_size=8, epochs=1), mask_fn=_mask_fn(0.15))
    total, stats = trainer.losses(_albef_batch(1))
    assert {"itc", "itm", "mlm"} == set(stats) and all(math.isfinite(v) for v in stats.values())
    total.backward()
    assert trainer.model.mlm_head.bias.grad is not None
    off = GckdTrainer(AlbefModel(AlbefConfig.tiny()), GckdConfig.source_only(mlm_weight=0.0), mask_fn=_mask_fn(0.15))
    assert off.mask_fn is None
    _, stats = off.losses(_albef_batch(1))
    assert "mlm" not in stats
    # feature heads have no MLM head: the mask function is ignored
    assert GckdTrainer(_model(), _config(), mask_fn=_mask_fn(0.15)).mask_fn is None


# ------------------------------------------------------------------------------------------------ non-finite loss


def _nan_images(trainer: GckdTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    original = trainer.model.encode_image

    def encode_image(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, feat = original(images)
        return tokens, torch.full_like(feat, float("nan"))

    monkeypatch.setattr(trainer.model, "encode_image", encode_image)


def test_non_finite_loss_raises_floating_point_error(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = GckdTrainer(_model(), _config(prop_weight=0, kd_weight=0, cd_itm_weight=0, itm_weight=0))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _nan_images(trainer, monkeypatch)
    with pytest.raises(FloatingPointError, match=r"non-finite features at step 0 \(source features\)"):
        trainer.fit(_data(target=False))
    # no optimiser step was taken
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_non_finite_features_with_itm_raise_floating_point_error(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = GckdTrainer(_model(), _config())
    _nan_images(trainer, monkeypatch)
    with pytest.raises(FloatingPointError, match="non-finite features"):
        trainer.fit(_data())


# ------------------------------------------------------------------------------------------------ KD candidates
@pytest.mark.parametrize("use_gnn", [False, True])
def test_kd_targets_use_the_target_banks(monkeypatch: pytest.MonkeyPatch, use_gnn: bool) -> None:
    """The memory columns of the CMKD targets are the *target* image / text banks (in that order of the
    node list), never a source bank: with the GNN off (or zero-initialised, i.e. the identity at step 0)
    the teacher candidates after the batch equal the banks' features exactly."""
    import crossret.textimage.gckd as gckd_module

    trainer = GckdTrainer(_model(), _config(use_gnn=use_gnn, memory_size=16))
    data = _data()
    batches = iter(data.batches(0))
    for _ in range(2):  # fill the banks with different content per bank
        batch = next(batches)
        trainer.losses(batch)
        trainer._enqueue(batch)
    seen: list[dict[str, torch.Tensor]] = []
    original = gckd_module.momentum_similarity_targets

    def spy(image: torch.Tensor, text: torch.Tensor, temp: Any, **kwargs: torch.Tensor) -> Any:
        seen.append(kwargs)
        return original(image, text, temp, **kwargs)

    monkeypatch.setattr(gckd_module, "momentum_similarity_targets", spy)
    trainer.model.eval()
    trainer.gnn.eval()
    trainer.losses(next(batches))
    kd_call = seen[-1]  # the target call comes after the source ITC call
    tb = TB
    memory = trainer.memory
    torch.testing.assert_close(kd_call["image_candidates"][tb:], memory.target_image.features())
    torch.testing.assert_close(kd_call["text_candidates"][tb:], memory.target_text.features())
    target_images, source_texts = memory.target_image.features(), memory.source_text.features()
    assert not torch.allclose(target_images, source_texts[: target_images.shape[0]])


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_student_itc_candidates_are_the_students_own_batch(alpha: float) -> None:
    """itc_candidates="student": ITC over the student's in-batch features (gradient to both towers, no
    bank), momentum-distillation targets over the teacher's batch only; "teacher" differs from it."""
    from crossret.textimage.losses import itc_loss, momentum_similarity_targets

    config = _config(prop_weight=0, kd_weight=0, cd_itm_weight=0, itm_weight=0, alpha=alpha, momentum=0.5,
                     itc_candidates="student")
    def moved(trainer: GckdTrainer) -> GckdTrainer:
        """The student moved away from the teacher (a copy of it at construction), as after training."""
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
        trainer.model.eval()  # no dropout, so the features recomputed below are the step's
        trainer.teacher.eval()
        return trainer

    trainer = moved(GckdTrainer(_model(), config))
    batch = _first_batch(_data(target=False))
    # The step's teacher = EMA update of the teacher towards the student, made first inside losses().
    total, stats = trainer.losses(batch)
    with torch.no_grad():
        _, f_vs = trainer.model.encode_image(batch.source_images)
        _, f_ts = trainer.model.encode_text(batch.source_text)
        _, tf_vs = trainer.teacher.encode_image(batch.source_images)
        _, tf_ts = trainer.teacher.encode_text(batch.source_text)
        temp = trainer.model.clamped_temp()
        soft = momentum_similarity_targets(tf_vs, tf_ts, temp, text_candidates=tf_ts, image_candidates=tf_vs)
        expected = itc_loss(f_vs, f_ts, temp, batch.source_ids, soft, alpha)
    assert stats["itc"] == pytest.approx(float(expected), rel=1e-5)
    total.backward()  # the text tower gets ITC gradient through the candidates too
    text_grads = [p.grad for name, p in trainer.model.named_parameters() if "text" in name and p.ndim > 1]
    assert text_grads and all(g is not None and float(g.abs().sum()) > 0 for g in text_grads)
    teacher_mode = moved(GckdTrainer(_model(), _config(prop_weight=0, kd_weight=0, cd_itm_weight=0, itm_weight=0,
                                                       alpha=alpha, momentum=0.5)))
    _, other = teacher_mode.losses(batch)
    assert other["itc"] != pytest.approx(stats["itc"], rel=1e-3)


def test_itc_candidates_config_error() -> None:
    with pytest.raises(ConfigError, match="itc_candidates"):
        _config(itc_candidates="bank")
