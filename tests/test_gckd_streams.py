"""GCKD training batches (crossret.textimage.streams): validation, determinism per (seed, epoch), the
identity-balanced source batches, the target index streams (unpaired / paired) and hidden target ids,
for precomputed features and for person-retrieval datasets on disk."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from crossret.data.person import (
    HIDDEN_ID,
    IdentityBalancedBatchSampler,
    ImageTransform,
    TrainPairs,
    build_train_pairs,
    load_image,
    load_person_dataset,
)
from crossret.data.synthetic_person import generate_person_dataset
from crossret.errors import ConfigError, DataError
from crossret.textimage.streams import FeatureTrainingData, PersonTrainingData, StepBatch
from crossret.textimage.tokenize import CaptionTokenizer, train_wordpiece_vocab

D_IMG, D_TXT = 6, 5


def _source(n_ids: int = 7, per_id: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = n_ids * per_id
    # ids deliberately not sorted and not contiguous
    ids = rng.permutation(np.repeat(np.arange(n_ids) * 3 + 5, per_id))
    return rng.normal(size=(n, D_IMG)), rng.normal(size=(n, D_TXT)), ids


def _features(**kwargs: Any) -> FeatureTrainingData:
    si, st, ids = _source()
    rng = np.random.default_rng(1)
    values: dict[str, Any] = dict(target_image=rng.normal(size=(11, D_IMG)), target_text=rng.normal(size=(13, D_TXT)),
                                  ids_per_batch=3, pairs_per_id=2, target_batch=4, seed=3)
    values.update(kwargs)
    return FeatureTrainingData(si, st, ids, **values)


def _assert_batches_equal(a: list[StepBatch], b: list[StepBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name, u, v in zip(StepBatch._fields, x, y, strict=True):
            assert (u is None) == (v is None), name
            if u is not None:
                assert u.dtype == v.dtype and torch.equal(u, v), name


def _batches_differ(a: list[StepBatch], b: list[StepBatch]) -> bool:
    return any(not torch.equal(x.source_ids, y.source_ids) or not torch.equal(x.source_images, y.source_images)
               for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------------ features: checks


def test_feature_source_row_mismatch() -> None:
    si, st, ids = _source()
    with pytest.raises(DataError, match=r"21 image rows, 20 text rows and 21 ids must be equal"):
        FeatureTrainingData(si, st[:-1], ids)
    with pytest.raises(DataError, match=r"21 image rows, 21 text rows and 19 ids"):
        FeatureTrainingData(si, st, ids[:-2])


@pytest.mark.parametrize("where", ["source_image", "source_text", "target_image", "target_text"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_feature_non_finite_rejected(where: str, bad: float) -> None:
    si, st, ids = _source()
    rng = np.random.default_rng(1)
    arrays = {"source_image": si, "source_text": st, "target_image": rng.normal(size=(5, D_IMG)),
              "target_text": rng.normal(size=(5, D_TXT))}
    arrays[where] = arrays[where].copy()
    arrays[where][2, 1] = bad
    name = where.replace("_", " ") + " features"
    with pytest.raises(DataError, match=rf"{name}: contains NaN or inf"):
        FeatureTrainingData(arrays["source_image"], arrays["source_text"], ids, target_image=arrays["target_image"],
                            target_text=arrays["target_text"], ids_per_batch=2, pairs_per_id=2, target_batch=4)


def test_feature_shape_and_dtype_checks() -> None:
    si, st, ids = _source()
    with pytest.raises(DataError, match=r"source image features: expected a non-empty \(N, d\) matrix"):
        FeatureTrainingData(si.reshape(-1), st, ids)
    with pytest.raises(DataError, match=r"source text features: expected a non-empty"):
        FeatureTrainingData(si, np.zeros((0, D_TXT)), ids)
    with pytest.raises(DataError, match="expected numbers"):
        FeatureTrainingData(si.astype(str), st, ids)
    with pytest.raises(DataError, match=r"target image features have 4 dims, source 6"):
        _features(target_image=np.zeros((11, 4)))
    with pytest.raises(DataError, match=r"target text features have 7 dims, source 5"):
        _features(target_text=np.zeros((13, 7)))
    # integer features are accepted and converted to float32
    data = FeatureTrainingData(np.arange(21 * D_IMG).reshape(21, D_IMG), st, ids, ids_per_batch=2, pairs_per_id=2)
    assert data.source_image.dtype == np.float32


@pytest.mark.parametrize("missing", ["target_image", "target_text"])
def test_feature_missing_target_modality(missing: str) -> None:
    with pytest.raises(DataError, match="needs both target image and target text"):
        _features(**{missing: None})


def test_feature_target_batch_too_large() -> None:
    with pytest.raises(ConfigError, match=r"target_batch=12 exceeds the 11 target items"):
        _features(target_batch=12)
    assert _features(target_batch=11).target_batch == 11


def test_feature_paired_needs_equal_rows_and_valid_pairing() -> None:
    with pytest.raises(DataError, match="target_pairing='paired' needs row-aligned"):
        _features(target_pairing="paired")
    with pytest.raises(ConfigError, match=r"target_pairing='mixed'; choose one of unpaired, paired"):
        _features(target_pairing="mixed")


def test_feature_sampler_checks_are_passed_through() -> None:
    si, st, ids = _source()
    with pytest.raises(ConfigError, match="only 7 identities"):
        FeatureTrainingData(si, st, ids, ids_per_batch=8)
    bad = ids.copy()
    bad[0] = -1
    with pytest.raises(DataError, match="unknown ids"):
        FeatureTrainingData(si, st, bad)


# ------------------------------------------------------------------------------------------------ features: batches


def test_feature_batches_deterministic_per_seed_and_epoch() -> None:
    data = _features()
    e0, e0_again, e1 = list(data.batches(0)), list(data.batches(0)), list(data.batches(1))
    _assert_batches_equal(e0, e0_again)
    _assert_batches_equal(e0, list(_features().batches(0)))  # a second instance, same seed
    assert _batches_differ(e0, e1)
    assert any(not torch.equal(a.target_image_index, b.target_image_index) for a, b in zip(e0, e1, strict=True))
    assert _batches_differ(e0, list(_features(seed=4).batches(0)))


def test_feature_source_batches_follow_the_identity_sampler() -> None:
    data = _features()
    si, st, ids = _source()
    sampler = IdentityBalancedBatchSampler(ids, 3, 2, seed=3)
    for epoch in (0, 2):
        batches = list(data.batches(epoch))
        expected = sampler.batches(epoch)
        assert len(batches) == len(expected) == data.steps_per_epoch() == len(sampler)
        seen: Counter[int] = Counter()
        for batch, rows in zip(batches, expected, strict=True):
            rows = np.asarray(rows)
            assert batch.source_images.shape == (6, D_IMG) and batch.source_images.dtype == torch.float32
            assert batch.source_text.shape == (6, D_TXT) and batch.source_mask is None
            assert batch.source_ids.dtype == torch.int64
            assert torch.equal(batch.source_images, torch.from_numpy(si[rows].astype(np.float32)))
            assert torch.equal(batch.source_text, torch.from_numpy(st[rows].astype(np.float32)))
            assert batch.source_ids.tolist() == ids[rows].tolist()
            # p = 3 distinct identities, each k = 2 consecutive rows
            blocks = batch.source_ids.view(3, 2)
            assert (blocks[:, 0] == blocks[:, 1]).all() and len(set(blocks[:, 0].tolist())) == 3
            seen.update(rows.tolist())
        assert set(seen) == set(range(len(ids)))  # every pair appears at least once per epoch


def test_feature_steps_per_epoch_counts_the_batches() -> None:
    for p, k in ((1, 1), (2, 3), (7, 1), (4, 4)):
        si, st, ids = _source()
        data = FeatureTrainingData(si, st, ids, target_image=si, target_text=st, ids_per_batch=p, pairs_per_id=k,
                                   target_batch=5)
        assert data.steps_per_epoch() == sum(1 for _ in data.batches(0)) == sum(1 for _ in data.batches(1))


def test_feature_unpaired_target_streams() -> None:
    si, st, ids = _source()
    rng = np.random.default_rng(2)
    ti, tt = rng.normal(size=(8, D_IMG)), rng.normal(size=(8, D_TXT))
    data = FeatureTrainingData(si, st, ids, target_image=ti, target_text=tt, ids_per_batch=3, pairs_per_id=2,
                               target_batch=4, seed=3)
    batches = list(data.batches(0))
    img_rows = [b.target_image_index.tolist() for b in batches]
    txt_rows = [b.target_text_index.tolist() for b in batches]
    assert img_rows != txt_rows  # two independent streams: no pairing reaches training
    for b in batches:
        assert b.target_image_index.dtype == torch.int64 and b.target_text_index.dtype == torch.int64
        assert torch.equal(b.target_images, torch.from_numpy(ti[b.target_image_index.numpy()].astype(np.float32)))
        assert torch.equal(b.target_text, torch.from_numpy(tt[b.target_text_index.numpy()].astype(np.float32)))
        assert b.target_mask is None
        assert len(set(b.target_image_index.tolist())) == 4 and len(set(b.target_text_index.tolist())) == 4
    # each stream walks through permutations: two consecutive batches of 4 cover the 8 rows
    for rows in (img_rows, txt_rows):
        for start in range(0, len(rows) - 1, 2):
            assert sorted(rows[start] + rows[start + 1]) == list(range(8))


def test_feature_cycling_skips_the_incomplete_tail() -> None:
    si, st, ids = _source()
    rng = np.random.default_rng(2)
    data = FeatureTrainingData(si, st, ids, target_image=rng.normal(size=(10, D_IMG)),
                               target_text=rng.normal(size=(7, D_TXT)), ids_per_batch=3, pairs_per_id=2,
                               target_batch=3, seed=0)
    for b in data.batches(0):
        assert b.target_images.shape == (3, D_IMG) and b.target_text.shape == (3, D_TXT)
        assert len(set(b.target_image_index.tolist())) == 3 and len(set(b.target_text_index.tolist())) == 3
        assert int(b.target_image_index.max()) < 10 and int(b.target_text_index.max()) < 7


def test_feature_paired_target_rows_are_pairs() -> None:
    si, st, ids = _source()
    rng = np.random.default_rng(2)
    ti, tt = rng.normal(size=(9, D_IMG)), rng.normal(size=(9, D_TXT))
    data = FeatureTrainingData(si, st, ids, target_image=ti, target_text=tt, ids_per_batch=3, pairs_per_id=2,
                               target_batch=4, seed=3, target_pairing="paired")
    batches = list(data.batches(1))
    assert len(batches) == data.steps_per_epoch()
    for b in batches:
        assert torch.equal(b.target_image_index, b.target_text_index)
        rows = b.target_text_index.numpy()
        assert torch.equal(b.target_images, torch.from_numpy(ti[rows].astype(np.float32)))
        assert torch.equal(b.target_text, torch.from_numpy(tt[rows].astype(np.float32)))


def test_feature_source_only_batches_have_no_target_fields() -> None:
    si, st, ids = _source()
    data = FeatureTrainingData(si, st, ids, ids_per_batch=3, pairs_per_id=2)
    assert not data.has_target and data.target_truth() is None and not data.uses_tokens
    for b in data.batches(0):
        assert b.target_images is None and b.target_text is None and b.target_mask is None
        assert b.target_image_index is None and b.target_text_index is None
    assert data.fingerprint()["target_images"] == 0


def test_feature_target_ids_never_in_a_batch() -> None:
    img_truth, txt_truth = np.arange(11) + 1000, np.arange(13) + 2000
    data = _features(target_truth_ids=(img_truth, txt_truth))
    truth = data.target_truth()
    assert truth is not None
    assert truth[0].tolist() == img_truth.tolist() and truth[1].tolist() == txt_truth.tolist()
    assert truth[0].dtype == np.int64
    _, _, ids = _source()
    for b in data.batches(0):
        for name, t in zip(StepBatch._fields, b, strict=True):
            if t is not None and not t.is_floating_point():
                assert int(t.max()) < 1000, name  # row indices and source ids only
        assert set(b.source_ids.tolist()) <= set(ids.tolist())


def test_feature_fingerprint() -> None:
    fp = _features().fingerprint()
    assert fp == _features().fingerprint()
    assert fp["kind"] == "features" and fp["source"] == 21 and fp["target_images"] == 11 and fp["target_texts"] == 13
    rng = np.random.default_rng(9)
    assert _features(target_image=rng.normal(size=(11, D_IMG))).fingerprint()["checksum"] != fp["checksum"]
    # the seed is not part of the data: the config (which holds it) is fingerprinted separately
    assert _features(seed=99).fingerprint() == fp


def test_step_batch_to_keeps_none() -> None:
    b = StepBatch(torch.zeros(2, 3), torch.zeros(2, 4), None, torch.tensor([1, 2]))
    moved = b.to("cpu")
    assert isinstance(moved, StepBatch) and moved.source_mask is None and moved.target_images is None
    assert torch.equal(moved.source_ids, b.source_ids)


# ------------------------------------------------------------------------------------------------ person datasets


@pytest.fixture(scope="module")
def person(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gckd_person")
    src_dir = generate_person_dataset("cuhk-pedes", root / "src", n_train_ids=8, n_test_ids=2, images_per_id=2,
                                      seed=1, image_size=(32, 16))
    tgt_dir = generate_person_dataset("rstpreid", root / "tgt", n_train_ids=8, n_test_ids=2, images_per_id=2,
                                      seed=2, image_size=(32, 16))
    source = build_train_pairs(load_person_dataset(None, src_dir))
    target = build_train_pairs(load_person_dataset(None, tgt_dir))
    vocab = train_wordpiece_vocab(list(source.captions) + list(target.captions), root / "vocab.txt", vocab_size=300)
    tokenizer = CaptionTokenizer.from_vocab(vocab, max_length=24)
    return {"source": source, "target": target, "tokenizer": tokenizer}


def _person_data(person: dict[str, Any], **kwargs: Any) -> PersonTrainingData:
    values: dict[str, Any] = dict(target=person["target"], ids_per_batch=4, pairs_per_id=2, target_batch=5, seed=7)
    values.update(kwargs)
    return PersonTrainingData(person["source"], person["tokenizer"], ImageTransform.train((32, 16), flip_prob=0.5),
                              **values)


def test_person_batches_shapes_and_contents(person: dict[str, Any]) -> None:
    source: TrainPairs = person["source"]
    target: TrainPairs = person["target"]
    tok: CaptionTokenizer = person["tokenizer"]
    data = _person_data(person)
    assert data.uses_tokens and data.has_target
    plain = ImageTransform.eval((32, 16))
    sampler = IdentityBalancedBatchSampler(source.person_ids, 4, 2, seed=7)
    batches = list(data.batches(0))
    assert len(batches) == data.steps_per_epoch() == len(sampler) > 0
    for b, rows in zip(batches, sampler.batches(0), strict=True):
        assert b.source_images.shape == (8, 3, 32, 16) and b.source_images.dtype == torch.float32
        assert b.target_images.shape == (5, 3, 32, 16)
        ids, mask = tok([source.captions[i] for i in rows])
        assert torch.equal(b.source_text, ids) and torch.equal(b.source_mask, mask)
        assert b.source_text.dtype == torch.int64 and b.source_text.shape[1] <= 24
        assert (b.source_text[:, 0] == tok.cls_token_id).all()
        assert b.source_ids.tolist() == source.person_ids[rows].tolist()
        t_ids, t_mask = tok([target.captions[i] for i in b.target_text_index.tolist()])
        assert torch.equal(b.target_text, t_ids) and torch.equal(b.target_mask, t_mask)
        # pixels: the image of each row, possibly flipped horizontally
        for img, path in [(b.source_images[j], source.image_paths[source.image_index[r]]) for j, r in enumerate(rows)] \
                + [(b.target_images[j], target.image_paths[r]) for j, r in enumerate(b.target_image_index.tolist())]:
            ref = plain(load_image(path))
            assert torch.equal(img, ref) or torch.equal(img, ref.flip(-1))


def test_person_flips_vary(person: dict[str, Any]) -> None:
    plain = ImageTransform.eval((32, 16))
    source: TrainPairs = person["source"]
    data = _person_data(person)
    flips = []
    for b, rows in zip(data.batches(0), data.sampler.batches(0), strict=True):
        for j, r in enumerate(rows):
            ref = plain(load_image(source.image_paths[source.image_index[r]]))
            flips.append(not torch.equal(b.source_images[j], ref))
    assert any(flips) and not all(flips)


def test_person_batches_deterministic(person: dict[str, Any]) -> None:
    data = _person_data(person)
    e0 = list(data.batches(0))
    _assert_batches_equal(e0, list(data.batches(0)))
    _assert_batches_equal(e0, list(_person_data(person).batches(0)))
    e1 = list(data.batches(1))
    assert _batches_differ(e0, e1)


def test_person_target_ids_hidden(person: dict[str, Any]) -> None:
    target: TrainPairs = person["target"]
    assert not target.ids_hidden
    data = _person_data(person)
    truth = data.target_truth()
    assert truth is not None
    assert np.array_equal(truth[0], target.image_person_ids) and np.array_equal(truth[1], target.person_ids)
    # the stream's own view of the target has no identities at all
    assert data.target.ids_hidden and (data.target.image_person_ids == HIDDEN_ID).all()
    assert data.target.original_ids.size == 0
    assert data.target.captions == target.captions and data.target.image_paths == target.image_paths
    # the only id field of a step is the source's
    id_fields = [f for f in StepBatch._fields if "ids" in f]
    assert id_fields == ["source_ids"]
    for b in data.batches(0):
        assert b.source_ids.shape == (8,)
        assert set(b.source_ids.tolist()) <= set(person["source"].person_ids.tolist())
        # target indices are row indices, in range of the target lists
        assert int(b.target_image_index.max()) < len(target.image_paths)
        assert int(b.target_text_index.max()) < len(target)
    # an already hidden target gives no truth
    hidden = _person_data(person, target=target.without_ids())
    assert hidden.target_truth() is None and hidden.has_target


def test_person_paired_target(person: dict[str, Any]) -> None:
    target: TrainPairs = person["target"]
    data = _person_data(person, target_pairing="paired")
    for b in data.batches(0):
        assert b.target_image_index.tolist() == target.image_index[b.target_text_index.numpy()].tolist()


def test_person_checks(person: dict[str, Any]) -> None:
    with pytest.raises(DataError, match="source pairs have no identities"):
        PersonTrainingData(person["source"].without_ids(), person["tokenizer"], ImageTransform.eval((32, 16)))
    n_images = len(person["target"].image_paths)
    with pytest.raises(ConfigError, match=rf"target_batch={n_images + 1} exceeds the {n_images} target items"):
        _person_data(person, target_batch=n_images + 1)
    with pytest.raises(ConfigError, match="target_pairing"):
        _person_data(person, target_pairing="aligned")


def test_person_source_only_and_fingerprint(person: dict[str, Any]) -> None:
    data = _person_data(person, target=None)
    assert not data.has_target and data.target_truth() is None
    b = next(iter(data.batches(0)))
    assert b.target_images is None and b.target_text is None and b.target_image_index is None
    fp = _person_data(person).fingerprint()
    assert fp["kind"] == "person" and fp["source_pairs"] == len(person["source"])
    assert fp["target_pairs"] == len(person["target"]) and data.fingerprint()["target_pairs"] == 0


# ------------------------------------------------------------------------------------------------ fetch by index
def test_feature_fetch_by_index_returns_the_rows() -> None:
    si, st, ids = _source()
    data = _features()
    assert data.target_sizes() == (11, 13) and data.source_size() == len(ids)
    idx = np.array([10, 0, 3, 3])
    assert np.array_equal(data.target_images(idx, key=5).numpy(), data.target_image[idx])
    text, mask = data.target_captions(np.array([12, 1]))
    assert mask is None and np.array_equal(text.numpy(), data.target_text[[12, 1]])
    images, texts, mask, pair_ids = data.source_pairs(np.array([4, 2]))
    assert mask is None and np.array_equal(images.numpy(), si[[4, 2]].astype(np.float32))
    assert np.array_equal(texts.numpy(), st[[4, 2]].astype(np.float32)) and pair_ids.tolist() == ids[[4, 2]].tolist()
    for bad in (np.array([11]), np.array([-1])):
        with pytest.raises(DataError, match="out of range"):
            data.target_images(bad)
    with pytest.raises(DataError, match="no target"):
        _features(target_image=None, target_text=None).target_sizes()


def test_person_fetch_by_index_returns_the_dataset_items(person: dict[str, Any]) -> None:
    from crossret.data.person import item_rng

    source: TrainPairs = person["source"]
    target: TrainPairs = person["target"]
    tok: CaptionTokenizer = person["tokenizer"]
    data = _person_data(person)
    transform = ImageTransform.train((32, 16), flip_prob=0.5)
    assert data.target_sizes() == (len(target.image_paths), len(target)) and data.source_size() == len(source)
    idx = np.array([3, 0, 3, len(target.image_paths) - 1])
    batches = data.batches(0)
    first = next(batches)  # a fetch in the middle of an epoch's stream leaves the stream as it is
    images = data.target_images(idx, key=4)
    seed = 7 + PersonTrainingData.FETCH_SEED
    for img, i in zip(images, idx, strict=True):
        assert torch.equal(img, transform(load_image(target.image_paths[i]), item_rng(seed, 4, int(i))))
    assert torch.equal(images, data.target_images(idx, key=4))  # the same key: the same tensors
    rest = list(batches)
    _assert_batches_equal([first, *rest], list(_person_data(person).batches(0)))
    captions = np.array([len(target) - 1, 2])
    ids, mask = data.target_captions(captions)
    ref_ids, ref_mask = tok([target.captions[i] for i in captions])
    assert torch.equal(ids, ref_ids) and mask is not None and torch.equal(mask, ref_mask)
    rows = np.array([5, 1])
    s_img, s_ids, s_mask, s_pid = data.source_pairs(rows, key=0)
    ref_ids, ref_mask = tok([source.captions[i] for i in rows])
    assert torch.equal(s_ids, ref_ids) and s_mask is not None and torch.equal(s_mask, ref_mask)
    assert s_pid.tolist() == source.person_ids[rows].tolist()
    for img, r in zip(s_img, rows, strict=True):
        image_row = int(source.image_index[r])
        assert torch.equal(img, transform(load_image(source.image_paths[image_row]), item_rng(seed, 0, image_row)))
    with pytest.raises(DataError, match="out of range"):
        data.target_captions(np.array([len(target)]))
    with pytest.raises(DataError, match="no target"):
        _person_data(person, target=None).target_images(np.array([0]))
