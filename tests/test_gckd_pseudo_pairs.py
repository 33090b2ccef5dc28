"""GCKD cross-domain ITM pseudo-pairs mined over the memory banks (``cd_itm_mining="banks"``), the bank warm
start, the target MLM, the α ramp, the target-pairing record and checkpoints of the earlier layout."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossret.textimage.gckd as gckd_module
from crossret.errors import ConfigError
from crossret.storage.sealed import save_torch
from crossret.textimage.gckd import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LEGACY_VALUES,
    GckdConfig,
    GckdTrainer,
    mlm_distill_loss,
    read_checkpoint,
)
from crossret.textimage.losses import mutual_nearest_pairs
from crossret.textimage.memory import GckdMemory
from crossret.textimage.streams import FeatureTrainingData, StepBatch

IMAGE_DIM, TEXT_DIM, EMBED_DIM = 12, 9, 16
P, K, TB = 2, 2, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0, **overrides: Any) -> Any:
    from crossret.textimage.feature_heads import FeatureHeadsConfig, FeatureHeadsModel

    torch.manual_seed(seed)
    return FeatureHeadsModel(FeatureHeadsConfig(image_dim=IMAGE_DIM, text_dim=TEXT_DIM, embed_dim=EMBED_DIM,
                                                hidden_dim=32, fusion_dim=16, **overrides))


def _config(**overrides: Any) -> GckdConfig:
    values: dict[str, Any] = dict(epochs=1, ids_per_batch=P, pairs_per_id=K, target_batch=TB, memory_size=16,
                                  knn_k=3, warmup_epochs=0.5, cd_itm_mining="banks")
    values.update(overrides)
    return GckdConfig.from_dict(values)


def _truth(n_ti: int = 10, n_tt: int = 14) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n_ti) % 3, np.arange(n_tt) % 3


def _data(*, n_ti: int = 10, n_tt: int = 14, seed: int = 0, truth: tuple[np.ndarray, np.ndarray] | None = None,
          pairing: str = "unpaired") -> FeatureTrainingData:
    rng = np.random.default_rng(100 + seed)
    return FeatureTrainingData(rng.normal(size=(18, IMAGE_DIM)), rng.normal(size=(18, TEXT_DIM)),
                               np.repeat(np.arange(6), 3), target_image=rng.normal(size=(n_ti, IMAGE_DIM)),
                               target_text=rng.normal(size=(n_tt, TEXT_DIM)), ids_per_batch=P, pairs_per_id=K,
                               target_batch=TB, seed=seed, target_pairing=pairing, target_truth_ids=truth)


# ------------------------------------------------------------------------------------------------ mutual NN
def _brute_mutual(cos: np.ndarray, delta: float, temp: float | None) -> set[tuple[int, int]]:
    """Every (text, image) that are each other's nearest neighbour, by explicit loops."""
    t_n, i_n = cos.shape
    out = set()
    for k in range(t_n):
        j = max(range(i_n), key=lambda jj: (cos[k, jj], -jj))
        k_best = max(range(t_n), key=lambda kk: (cos[kk, j], -kk))
        if k_best != k:
            continue
        if temp is None:
            score = cos[k, j]
        else:
            row = np.exp((cos[k] - cos[k].max()) / temp)
            score = row[j] / row.sum()
        if score >= delta:
            out.add((k, j))
    return out


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 9), (20, 20), (40, 13)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutual_nearest_pairs_match_brute_force(shape: tuple[int, int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(shape[0], 6, generator=g, dtype=torch.float64), dim=1)
    image = F.normalize(torch.randn(shape[1], 6, generator=g, dtype=torch.float64), dim=1)
    cos = text @ image.T
    for delta, temp in ((-1.0, None), (0.0, None), (0.5, None), (0.0, 0.1), (0.3, 0.1), (0.6, 0.05)):
        rows, cols = mutual_nearest_pairs(cos, delta, temp=temp)
        assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == sorted(_brute_mutual(cos.numpy(), delta, temp))
        assert rows.tolist() == sorted(rows.tolist())
        assert len(set(cols.tolist())) == cols.numel()  # one pair per image


def test_mutual_nearest_pairs_delta_threshold_is_inclusive_and_monotone() -> None:
    cos = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.1], [0.0, 0.4, 0.3], [0.1, 0.0, 0.7]], dtype=torch.float64)
    # mutual pairs: (0,0) 0.9, (1,1) 0.5, (3,2) 0.7; text 2's best image 1 prefers text 1
    rows, cols = mutual_nearest_pairs(cos, -1.0)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (1, 1), (3, 2)]
    rows, cols = mutual_nearest_pairs(cos, 0.7)  # ≥ δ: 0.7 kept
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (3, 2)]
    rows, _ = mutual_nearest_pairs(cos, 0.7000001)
    assert rows.tolist() == [0]
    assert mutual_nearest_pairs(cos, 0.95)[0].numel() == 0
    assert mutual_nearest_pairs(cos[:0], 0.0)[0].numel() == 0


# ------------------------------------------------------------------------------------------------ config
def test_new_config_keys_validate_and_keep_the_earlier_behaviour_reachable() -> None:
    c = GckdConfig()
    assert c.cd_itm_mining == "batch" and c.warm_start_banks and c.target_mlm_weight == 0.0 and c.alpha == 0.4
    assert c.warm_starts and not GckdConfig.source_only().warm_starts
    assert not GckdConfig(memory_size=0).warm_starts
    assert GckdConfig.source_only(target_mlm_weight=0.5).adapts
    for key, value in (("cd_itm_mining", "queue"), ("cd_itm_pairs", "all"), ("cd_itm_batch", 0),
                       ("warm_start_banks", 1), ("warm_start_samples", 0), ("target_mlm_weight", -1.0),
                       ("alpha_ramp_epochs", -0.5)):
        with pytest.raises(ConfigError, match=key):
            GckdConfig.from_dict({key: value})
    recorded = {k: v for k, v in GckdConfig().to_dict().items() if k not in LEGACY_VALUES}
    old = GckdConfig.from_recorded(recorded)
    assert not old.warm_start_banks and old.cd_itm_mining == "batch"
    assert GckdConfig.from_recorded({**recorded, "warm_start_banks": True}).warm_start_banks


def test_alpha_ramp_follows_albef() -> None:
    data = _data()
    steps = data.steps_per_epoch()
    seen: list[float] = []
    trainer = GckdTrainer(_model(), _config(epochs=2, alpha=0.4, alpha_ramp_epochs=1.0))
    original = trainer._alpha

    def spy() -> float:
        value = original()
        seen.append((trainer.step, value))  # type: ignore[arg-type]
        return value

    trainer._alpha = spy  # type: ignore[method-assign]
    trainer.fit(data)
    per_step = dict(seen)
    assert per_step[0] == 0.0
    assert all(per_step[s] == pytest.approx(0.4 * s / steps) for s in range(steps))
    assert all(per_step[s] == 0.4 for s in range(steps, 2 * steps))
    assert GckdTrainer(_model(), _config(alpha=0.4))._alpha() == 0.4  # no ramp by default


# ------------------------------------------------------------------------------------------------ warm start
def test_warm_start_fills_banks_with_the_teacher_features_of_the_sample() -> None:
    data = _data()
    trainer = GckdTrainer(_model(), _config(memory_size=8, warm_start_samples=6))
    counts = trainer.warm_start(data)
    assert counts == {"source": 6, "target_images": 6, "target_captions": 6}
    rng = np.random.default_rng([0, 4099])  # the documented sample: seed, then source, images, captions
    source = np.sort(rng.choice(18, 6, replace=False))
    images = np.sort(rng.choice(10, 6, replace=False))
    captions = np.sort(rng.choice(14, 6, replace=False))
    mem = trainer.memory
    assert mem is not None
    with torch.no_grad():
        _, sv = trainer.teacher.encode_image(torch.from_numpy(data.source_image[source]))
        _, st = trainer.teacher.encode_text(torch.from_numpy(data.source_text[source]))
        _, tv = trainer.teacher.encode_image(torch.from_numpy(data.target_image[images]))
        _, tt = trainer.teacher.encode_text(torch.from_numpy(data.target_text[captions]))
    for bank, feats, index in ((mem.source_image, sv, source), (mem.source_text, st, source),
                               (mem.target_image, tv, images), (mem.target_text, tt, captions)):
        assert len(bank) == 6
        torch.testing.assert_close(bank.features(), feats, rtol=0, atol=1e-6)
        assert bank.indices().tolist() == index.tolist()
    assert mem.source_image.ids().tolist() == data.source_ids[source].tolist()
    assert mem.target_image.ids().tolist() == [-1] * 6 and mem.target_text.domains().tolist() == [1] * 6


def test_fit_warm_starts_before_the_first_step_only_when_adapting() -> None:
    data = _data()
    seen: list[int] = []

    def record(trainer: GckdTrainer) -> None:
        original = trainer.losses

        def losses(batch: StepBatch, *args: Any) -> Any:
            if not seen:
                assert trainer.memory is not None
                seen.append(len(trainer.memory.target_image))
            return original(batch, *args)

        trainer.losses = losses  # type: ignore[method-assign]

    trainer = GckdTrainer(_model(), _config(memory_size=8))
    record(trainer)
    trainer.fit(data)
    assert seen == [8]  # full before step 0 (10 target images, capacity 8)
    seen.clear()
    trainer = GckdTrainer(_model(), _config(memory_size=8, warm_start_banks=False))
    record(trainer)
    trainer.fit(data)
    assert seen == [0]
    seen.clear()
    trainer = GckdTrainer(_model(), GckdConfig.source_only(epochs=1, ids_per_batch=P, pairs_per_id=K, memory_size=8))
    record(trainer)
    trainer.fit(data)
    assert seen == [0]


def test_warm_start_refuses_data_without_fetching() -> None:
    class Plain:
        has_target, uses_tokens = True, False

        def __init__(self, inner: FeatureTrainingData) -> None:
            self.inner = inner

        def steps_per_epoch(self) -> int:
            return self.inner.steps_per_epoch()

        def batches(self, epoch: int) -> Iterator[StepBatch]:
            return self.inner.batches(epoch)

        def fingerprint(self) -> dict[str, Any]:
            return self.inner.fingerprint()

        def target_truth(self) -> None:
            return None

    with pytest.raises(ConfigError, match="warm_start_banks"):
        GckdTrainer(_model(), _config()).fit(Plain(_data()))
    with pytest.raises(ConfigError, match="cd_itm_pairs"):
        GckdTrainer(_model(), _config(warm_start_banks=False, delta_on="cosine", delta=-1.0)).fit(Plain(_data()))
    # in-batch pairs need no fetching
    result = GckdTrainer(_model(), _config(warm_start_banks=False, cd_itm_pairs="in_batch")).fit(Plain(_data()))
    assert math.isfinite(result.history[0]["loss"])


# ------------------------------------------------------------------------------------------------ bank mining
def _expected_mining(trainer: GckdTrainer, batch: StepBatch, delta: float) -> set[tuple[int, int]]:
    """(caption, image) dataset-index pairs mined by hand: the teacher's batch features and the banks' entries,
    one feature per index (the batch's, else the newest bank entry), mutual nearest neighbours by loops."""
    assert batch.target_images is not None and batch.target_text is not None and trainer.memory is not None
    assert batch.target_text_index is not None and batch.target_image_index is not None
    with torch.no_grad():
        _, tv = trainer.teacher.encode_image(batch.target_images)
        _, tt = trainer.teacher.encode_text(batch.target_text)

    def table(batch_feat: torch.Tensor, batch_index: torch.Tensor, bank: Any) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for f, i in zip(bank.features(), bank.indices().tolist(), strict=True):  # oldest first: newer overwrite
            if i >= 0:
                out[i] = f.numpy()
        # the batch wins over the banks, and its first occurrence over later ones (written last)
        for f, i in reversed(list(zip(batch_feat, batch_index.tolist(), strict=True))):
            out[i] = f.numpy()
        return out

    texts = table(tt, batch.target_text_index, trainer.memory.target_text)
    images = table(tv, batch.target_image_index, trainer.memory.target_image)
    t_keys, i_keys = sorted(texts), sorted(images)
    cos = np.array([[float(np.dot(texts[t], images[i])) for i in i_keys] for t in t_keys])
    return {(t_keys[k], i_keys[j]) for k, j in _brute_mutual(cos, delta, None)}


def _first_step_with_banks(config: GckdConfig, data: FeatureTrainingData) -> tuple[GckdTrainer, StepBatch]:
    """A trainer whose banks hold a warm start and two steps (so batch and bank indices overlap)."""
    trainer = GckdTrainer(_model(), config)
    trainer._data = data
    trainer._truth = data.target_truth()
    trainer.warm_start(data)
    batches = iter(data.batches(0))
    for _ in range(2):
        batch = next(batches)
        trainer.losses(batch)
        trainer._enqueue(batch)
    trainer.model.eval()  # no dropout, so the hand recomputation sees the step's features
    return trainer, next(batches)


@pytest.mark.parametrize("delta", [-1.0, 0.2])
def test_bank_mining_and_precision_match_a_hand_count(delta: float, monkeypatch: pytest.MonkeyPatch) -> None:
    truth = _truth()
    data = _data(truth=truth)
    config = _config(use_gnn=False, delta_on="cosine", delta=delta, memory_size=6, warm_start_samples=5)
    trainer, batch = _first_step_with_banks(config, data)
    mined: list[Any] = []
    original = trainer._mine_bank_pairs

    def spy(*args: Any, **kwargs: Any) -> Any:
        mined.append(original(*args, **kwargs))
        return mined[-1]

    monkeypatch.setattr(trainer, "_mine_bank_pairs", spy)
    _, stats = trainer.losses(batch)  # the EMA update happens first: recompute with the teacher after it
    expected = _expected_mining(trainer, batch, delta)
    got = set(zip(mined[0].caption.tolist(), mined[0].image.tolist(), strict=True))
    assert got == expected and len(expected) > 0
    assert stats["pseudo_pairs"] == len(expected)
    hits = sum(int(truth[0][i] == truth[1][c]) for c, i in expected)
    assert stats["pseudo_pair_precision"] == pytest.approx(hits / len(expected))


def test_bank_mining_uses_the_propagated_teacher_and_probability_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the GNN the mined cosine is that of the propagated teacher nodes (batch rows, then bank rows); the
    probability threshold is the softmax at τ over all candidate images."""
    data = _data(truth=_truth())
    config = _config(delta_on="probability", delta=0.0, memory_size=6, warm_start_samples=5)
    trainer, batch = _first_step_with_banks(config, data)
    calls: list[tuple[torch.Tensor, Any]] = []
    original = gckd_module.mutual_nearest_pairs

    def spy(cos: torch.Tensor, delta: float, *, temp: Any = None) -> Any:
        calls.append((cos.clone(), None if temp is None else temp.detach()))
        return original(cos, delta, temp=temp)

    monkeypatch.setattr(gckd_module, "mutual_nearest_pairs", spy)
    _, stats = trainer.losses(batch)
    (cos, temp), = calls
    assert temp is not None and float(temp) == pytest.approx(float(trainer.model.clamped_temp().detach()))
    n_text = len({*batch.target_text_index.tolist(), *trainer.memory.target_text.indices().tolist()})
    n_image = len({*batch.target_image_index.tolist(), *trainer.memory.target_image.indices().tolist()})
    assert cos.shape == (n_text, n_image)
    assert stats["pseudo_pairs"] == original(cos, 0.0)[0].numel()
    prob_delta = float(F.softmax(cos / temp, dim=1).max(dim=1).values.median())
    assert original(cos, prob_delta, temp=temp)[0].numel() <= original(cos, -1.0)[0].numel()


def test_fetched_pseudo_pair_batch_and_its_exclusions(monkeypatch: pytest.MonkeyPatch) -> None:
    """cd_itm_pairs="fetch": the ITM's extra pool rows are exactly the fetched dataset items of mined pairs, and a
    hard negative is never a target item with teacher score ≥ δ against the positive (looked up by index)."""
    data = _data(truth=_truth())
    config = _config(use_gnn=False, delta_on="cosine", delta=0.1, memory_size=6, warm_start_samples=5,
                     cd_itm_batch=2)
    trainer, batch = _first_step_with_banks(config, data)
    fetched: dict[str, np.ndarray] = {}
    fetch_images, fetch_captions = data.target_images, data.target_captions

    def images(index: np.ndarray, key: int = 0) -> torch.Tensor:
        fetched["images"] = index.copy()
        return fetch_images(index, key)

    def captions(index: np.ndarray) -> tuple[torch.Tensor, None]:
        fetched["captions"] = index.copy()
        return fetch_captions(index)  # type: ignore[return-value]

    monkeypatch.setattr(data, "target_images", images)
    monkeypatch.setattr(data, "target_captions", captions)
    excluded: list[tuple[torch.Tensor, torch.Tensor]] = []
    original_sample = gckd_module.sample_hard_negatives

    def sample_spy(*args: Any, **kwargs: Any) -> Any:
        if "exclude" in kwargs:  # the cross-domain call (the source ITM's has none)
            excluded.append(kwargs["exclude"])
        return original_sample(*args, **kwargs)

    monkeypatch.setattr(gckd_module, "sample_hard_negatives", sample_spy)
    _, stats = trainer.losses(batch)
    expected = _expected_mining(trainer, batch, 0.1)  # with the teacher of the step (EMA'd inside losses)
    pairs = set(zip(fetched["captions"].tolist(), fetched["images"].tolist(), strict=True))
    assert len(pairs) == stats["cd_itm_pairs"] == min(2, len(expected)) and pairs <= expected
    # expected exclusions: pool = [batch; fetched]; source columns never excluded
    assert batch.target_images is not None and batch.target_text is not None
    with torch.no_grad():
        _, tv = trainer.teacher.encode_image(batch.target_images)
        _, tt = trainer.teacher.encode_text(batch.target_text)

    def feature(index: int, bank: Any, batch_index: torch.Tensor, batch_feat: torch.Tensor) -> torch.Tensor:
        hits = (batch_index == index).nonzero()
        if hits.numel():
            return batch_feat[int(hits[0])]
        return bank.features()[int((bank.indices() == index).nonzero()[-1])]

    pool_text = batch.target_text_index.tolist() + fetched["captions"].tolist()
    pool_image = batch.target_image_index.tolist() + fetched["images"].tolist()
    mem = trainer.memory
    assert mem is not None
    t_feat = torch.stack([feature(i, mem.target_text, batch.target_text_index, tt) for i in pool_text])
    v_feat = torch.stack([feature(i, mem.target_image, batch.target_image_index, tv) for i in pool_image])
    above = (t_feat @ v_feat.T) >= 0.1
    ex_txt, ex_img = excluded[-1]
    b_s, b_t, n = P * K, TB, len(pairs)
    rows = torch.arange(b_t, b_t + n)
    exp_img = torch.zeros(n, b_s + len(pool_image), dtype=torch.bool)
    exp_img[:, b_s:] = above[rows]
    exp_img[torch.arange(n), b_s + rows] = True
    exp_txt = torch.zeros(n, b_s + len(pool_text), dtype=torch.bool)
    exp_txt[:, b_s:] = above[:, rows].T
    exp_txt[torch.arange(n), b_s + rows] = True
    assert torch.equal(ex_img, exp_img) and torch.equal(ex_txt, exp_txt)
    assert not ex_img[:, :b_s].any()


def test_in_batch_pairs_are_the_mined_pairs_inside_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(truth=_truth())
    config = _config(use_gnn=False, delta_on="cosine", delta=-1.0, memory_size=6, warm_start_samples=5,
                     cd_itm_pairs="in_batch", itm_weight=0.0)  # no source ITM: the first _itm call is ours
    trainer, batch = _first_step_with_banks(config, data)
    itm_pairs: list[tuple[list[int], list[int]]] = []
    original = trainer._itm

    def spy(text_tok: Any, mask: Any, image_tok: Any, text_rows: Any = None, image_rows: Any = None) -> Any:
        if text_rows is not None and not itm_pairs:  # the first cross-domain call: the positives
            itm_pairs.append((text_rows.tolist(), image_rows.tolist()))
        return original(text_tok, mask, image_tok, text_rows, image_rows)

    monkeypatch.setattr(trainer, "_itm", spy)
    _, stats = trainer.losses(batch)
    expected = _expected_mining(trainer, batch, -1.0)
    ti, tt = batch.target_image_index.tolist(), batch.target_text_index.tolist()
    inside = sorted((tt.index(c), ti.index(i)) for c, i in expected if c in tt and i in ti)
    got = sorted(zip(*itm_pairs[0], strict=True)) if itm_pairs else []
    assert got == inside and stats["cd_itm_pairs"] == len(inside)
    assert 0 < len(inside) < len(expected)  # this case has pairs inside the batch and pairs reaching the banks


# ------------------------------------------------------------------------------------------------ resume
def test_resume_with_bank_mining_is_bit_exact(tmp_path: Path) -> None:
    data = _data(truth=_truth())
    config = _config(epochs=2, delta_on="cosine", delta=0.0, cd_itm_batch=3, memory_size=8)
    full = GckdTrainer(_model(), config, checkpoint_dir=tmp_path / "A")
    full_history = full.fit(data).history
    assert "pseudo_pair_precision" in full_history[0] and full_history[0]["pseudo_pairs"] > 0
    GckdTrainer(_model(), config, checkpoint_dir=tmp_path / "B").fit(data, should_stop=lambda: True)
    state = read_checkpoint(tmp_path / "B" / "checkpoint.pt")
    assert (state["memory"]["target_text.index_buf"] >= 0).all()
    torch.manual_seed(999)
    second = GckdTrainer(_model(), config, checkpoint_dir=tmp_path / "B")
    assert second.fit(data, resume=True).history == full_history
    for name, value in full.memory.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(value, second.memory.state_dict()[name]), name  # type: ignore[union-attr]
    for (name, a), b in zip(full.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_of_the_earlier_layout_resumes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint written before the banks stored indices and before the new config keys existed: its banks
    load with index -1 (and a warning), and training continues as the earlier trainer did."""
    data = _data()
    legacy = GckdConfig.from_dict({**_config(epochs=2).to_dict(), **LEGACY_VALUES})
    full_history = GckdTrainer(_model(), legacy).fit(data).history
    GckdTrainer(_model(), legacy, checkpoint_dir=tmp_path).fit(data, should_stop=lambda: True)
    path = tmp_path / "checkpoint.pt"
    state = read_checkpoint(path)
    state["memory"] = {k: v for k, v in state["memory"].items() if not k.endswith("index_buf")}
    state["fingerprint"]["config"] = {k: v for k, v in state["fingerprint"]["config"].items()
                                      if k not in LEGACY_VALUES}
    save_torch(path, state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    # today's defaults (warm start on: it only acts before the first step) resume it
    current = GckdConfig.from_dict({**legacy.to_dict(), "warm_start_banks": True})
    trainer = GckdTrainer(_model(), current, checkpoint_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="crossret.gckd"):
        result = trainer.fit(data, resume=True)
    assert result.resumed_from_epoch == 1 and result.history == full_history
    assert any("no dataset indices" in r.getMessage() for r in caplog.records)
    assert trainer.memory is not None and not trainer.memory.indices_restored
    # a behaviour key that differs from its earlier value is still refused
    changed = GckdConfig.from_dict({**legacy.to_dict(), "cd_itm_mining": "banks"})
    GckdTrainer(_model(), legacy, checkpoint_dir=tmp_path / "c").fit(data, should_stop=lambda: True)
    state = read_checkpoint(tmp_path / "c" / "checkpoint.pt")
    state["fingerprint"]["config"] = {k: v for k, v in state["fingerprint"]["config"].items()
                                      if k not in LEGACY_VALUES}
    save_torch(tmp_path / "c" / "checkpoint.pt", state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    with pytest.raises(ConfigError, match="different configuration"):
        GckdTrainer(_model(), changed, checkpoint_dir=tmp_path / "c").fit(data, resume=True)


def test_memory_state_without_indices_loads_with_minus_one(caplog: pytest.LogCaptureFixture) -> None:
    mem = GckdMemory(capacity=4, dim=3)
    feats = F.normalize(torch.randn(3, 3), dim=1)
    mem.enqueue(feats, feats, feats, feats, target_text_index=torch.tensor([5, 6, 7]))
    state = {k: v for k, v in mem.state_dict().items() if not k.endswith("index_buf")}
    fresh = GckdMemory(capacity=4, dim=3)
    fresh.target_text.enqueue(feats[:1], index=torch.tensor([9]))
    with caplog.at_level(logging.WARNING, logger="crossret.gckd"):
        fresh.load_state_dict(state)
    assert fresh.target_text.indices().tolist() == [-1, -1, -1] and not fresh.indices_restored
    torch.testing.assert_close(fresh.target_text.features(), feats)
    assert sum("no dataset indices" in r.getMessage() for r in caplog.records) == 4
    fresh.load_state_dict(mem.state_dict())
    assert fresh.target_text.indices().tolist() == [5, 6, 7] and fresh.indices_restored


# ------------------------------------------------------------------------------------------------ protocol record
def test_train_result_records_the_target_pairing() -> None:
    paired = _data(n_ti=10, n_tt=10, pairing="paired")
    result = GckdTrainer(_model(), _config(target_pairing="paired", cd_itm_mining="batch")).fit(paired)
    assert result.target_pairing == "paired"
    assert GckdTrainer(_model(), _config()).fit(_data()).target_pairing == "unpaired"
    source_only = GckdConfig.source_only(epochs=1, ids_per_batch=P, pairs_per_id=K, memory_size=8)
    assert GckdTrainer(_model(), source_only).fit(_data()).target_pairing is None


# ------------------------------------------------------------------------------------------------ target MLM
@pytest.fixture(scope="module")
def person(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from crossret.data.person import build_train_pairs, load_person_dataset
    from crossret.data.synthetic_person import generate_person_dataset
    from crossret.textimage.tokenize import CaptionTokenizer, train_wordpiece_vocab

    root = tmp_path_factory.mktemp("gckd_pp")
    src_dir = generate_person_dataset("cuhk-pedes", root / "src", n_train_ids=6, n_test_ids=2, images_per_id=2,
                                      seed=1, image_size=(32, 16))
    tgt_dir = generate_person_dataset("rstpreid", root / "tgt", n_train_ids=6, n_test_ids=2, images_per_id=2,
                                      seed=2, image_size=(32, 16))
    source = build_train_pairs(load_person_dataset(None, src_dir))
    target = build_train_pairs(load_person_dataset(None, tgt_dir))
    vocab = train_wordpiece_vocab(list(source.captions) + list(target.captions), root / "vocab.txt", vocab_size=200)
    return {"source": source, "target": target, "tokenizer": CaptionTokenizer.from_vocab(vocab, max_length=20)}


def _albef_setup(person: dict[str, Any], **train: Any) -> tuple[GckdTrainer, Any, Any]:
    from crossret.data.person import ImageTransform
    from crossret.textimage.albef import AlbefConfig, AlbefModel
    from crossret.textimage.streams import PersonTrainingData
    from crossret.textimage.tokenize import mask_tokens

    tok = person["tokenizer"]
    data = PersonTrainingData(person["source"], tok, ImageTransform.train((32, 16)), target=person["target"],
                              ids_per_batch=2, pairs_per_id=2, target_batch=4, seed=3)

    def mask_fn(ids: torch.Tensor, attention: torch.Tensor | None, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(ids, vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id,
                           special_ids=tok.special_ids, attention_mask=attention, mask_prob=0.5, generator=generator)

    torch.manual_seed(0)
    model = AlbefModel(AlbefConfig.tiny(vocab_size=tok.vocab_size, text_dropout=0.0))
    values: dict[str, Any] = dict(epochs=1, ids_per_batch=2, pairs_per_id=2, target_batch=4, memory_size=8, knn_k=3,
                                  cd_itm_mining="banks", cd_itm_pairs="in_batch", delta_on="cosine", delta=-1.0,
                                  use_gnn=False, itm_weight=0.0, mlm_weight=0.0, cd_itm_weight=0.0,
                                  warm_start_banks=False, target_mlm_weight=1.0, alpha=0.4)
    values.update(train)
    return GckdTrainer(model, GckdConfig.from_dict(values), mask_fn=mask_fn), data, mask_fn


def test_target_mlm_matches_manual(person: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """L_mlm^t = ALBEF's distilled MLM of each in-batch pseudo-pair's caption conditioned on its image: masks are
    the first draw of the trainer's generator (no ITM, no source MLM), teacher logits mixed at α."""
    trainer, data, mask_fn = _albef_setup(person)
    trainer._data = data
    batch = next(iter(data.batches(0)))
    pairs: list[Any] = []
    original = trainer._pseudo_pair_pool

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        pairs.append((out[1].clone(), out[2].clone()))
        return out

    monkeypatch.setattr(trainer, "_pseudo_pair_pool", spy)
    total, stats = trainer.losses(batch)
    text_idx, image_idx = pairs[0]
    assert text_idx.numel() > 0  # δ = -1: at least the global best pair is mutual
    masked, labels = mask_fn(batch.target_text[text_idx], batch.target_mask[text_idx],
                             torch.Generator().manual_seed(0))
    with torch.no_grad():
        s_tok, _ = trainer.model.encode_image(batch.target_images)
        t_tok, _ = trainer.teacher.encode_image(batch.target_images)
        logits = trainer.model.mlm_logits(masked, batch.target_mask[text_idx], s_tok[image_idx])
        t_logits = trainer.teacher.mlm_logits(masked, batch.target_mask[text_idx], t_tok[image_idx])
    expected = mlm_distill_loss(logits, labels, t_logits, 0.4)
    assert stats["target_mlm"] == pytest.approx(float(expected), rel=1e-4)
    assert "mlm" not in stats
    weighted = sum(stats[k] for k in ("itc", "kd", "target_mlm"))  # no GNN: no prop term
    assert float(total.detach()) == pytest.approx(weighted, rel=1e-5)
    without = mlm_distill_loss(logits, labels, None, 0.0)
    assert float(expected) != pytest.approx(float(without), rel=1e-4)  # α changes it: the teacher is used


def test_target_mlm_with_fetched_pairs_and_warm_start_trains(person: dict[str, Any]) -> None:
    trainer, data, _ = _albef_setup(person, cd_itm_pairs="fetch", cd_itm_weight=1.0, itm_weight=1.0,
                                    mlm_weight=1.0, warm_start_banks=True, cd_itm_batch=3)
    target = person["target"]
    result = trainer.fit(data)
    entry = result.history[0]
    assert {"target_mlm", "cd_itm", "mlm", "pseudo_pairs", "cd_itm_pairs"} <= set(entry)
    assert all(math.isfinite(v) for v in entry.values())
    assert 0.0 <= entry["pseudo_pair_precision"] <= 1.0
    mem = trainer.memory
    assert mem is not None
    assert set(mem.target_text.indices().tolist()) <= set(range(len(target)))
    assert set(mem.target_image.indices().tolist()) <= set(range(len(target.image_paths)))
