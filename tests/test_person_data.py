"""Person-retrieval dataset layer: the three annotation formats read back what the generator wrote,
every malformed annotation fails with a message naming the entry and the problem, captions are
cleaned exactly as RaSa does, transforms match a hand computation (and PIL), samplers keep their
invariants, and the target stream carries no identities."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from crossret.data.person import (
    CLIP_MEAN,
    CLIP_STD,
    CaptionDataset,
    IdentityBalancedBatchSampler,
    ImageTransform,
    PairDataset,
    PersonImageDataset,
    ShuffledBatchSampler,
    build_eval_view,
    build_train_pairs,
    clean_caption,
    detect_person_format,
    load_image,
    load_person_dataset,
    read_cuhk_pedes,
    read_icfg_pedes,
    read_rstpreid,
    verify_images,
)
from crossret.data.synthetic_person import ANNOTATION_FILES, STYLES, generate_person_datasets
from crossret.errors import ConfigError, DataError

N_TRAIN, N_VAL, N_TEST, PER_ID = 12, 2, 4, 3
CAPTIONS_PER_IMAGE = {"cuhk-pedes": 2, "icfg-pedes": 1, "rstpreid": 2}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("person")
    return generate_person_datasets(root, n_train_ids=N_TRAIN, n_val_ids=N_VAL, n_test_ids=N_TEST,
                                    images_per_id=PER_ID, seed=5, image_size=(32, 16))


def _entries(generated: dict[str, Path], style: str) -> list[dict]:
    return json.loads((generated[style] / ANNOTATION_FILES[style]).read_text())


def _write_variant(tmp_path: Path, style: str, entries: list) -> Path:
    """An annotation file in tmp_path whose images are the generated ones (via image_root)."""
    (tmp_path / ANNOTATION_FILES[style]).write_text(json.dumps(entries))
    return tmp_path


def _load_variant(tmp_path: Path, generated: dict[str, Path], style: str, entries: list) -> None:
    root = _write_variant(tmp_path, style, entries)
    load_person_dataset(style, root, image_root=generated[style] / "imgs")


# ---------------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("style", STYLES)
def test_reader_round_trip(generated: dict[str, Path], style: str) -> None:
    raw = _entries(generated, style)
    reader = {"cuhk-pedes": read_cuhk_pedes, "icfg-pedes": read_icfg_pedes, "rstpreid": read_rstpreid}[style]
    dataset = reader(generated[style])
    auto = load_person_dataset(None, generated[style])
    assert auto.name == style and len(auto) == len(dataset) == len(raw)
    n_val = 0 if style == "icfg-pedes" else N_VAL
    assert dataset.split_counts() == {"train": N_TRAIN * PER_ID, "val": n_val * PER_ID, "test": N_TEST * PER_ID}
    # 0-based ids, in the order the generator assigns them (train, then val, then test).
    assert sorted(set(dataset.split("train").person_ids.tolist())) == list(range(N_TRAIN))
    first_test = N_TRAIN + n_val
    assert sorted(set(dataset.split("test").person_ids.tolist())) == list(range(first_test, first_test + N_TEST))
    base = 1 if style == "cuhk-pedes" else 0
    path_key = "img_path" if style == "rstpreid" else "file_path"
    for record, entry in zip(dataset, raw, strict=True):
        assert record.person_id == entry["id"] - base
        assert record.captions == entry["captions"] and len(record.captions) == CAPTIONS_PER_IMAGE[style]
        assert Path(record.image_path).is_absolute() and Path(record.image_path).is_file()
        assert record.image_path == str((generated[style] / "imgs" / entry[path_key]).resolve())
        assert record.split == entry["split"]
    assert dataset.num_captions == len(raw) * CAPTIONS_PER_IMAGE[style]
    assert len(dataset.split("val")) == n_val * PER_ID  # ICFG: an empty val split, not an error
    with pytest.raises(ConfigError, match="unknown split"):
        dataset.split("dev")


def test_detection_and_roots(generated: dict[str, Path], tmp_path: Path) -> None:
    parent = generated["cuhk-pedes"].parent  # holds CUHK-PEDES/, ICFG-PEDES/, RSTPReid/
    assert detect_person_format(generated["icfg-pedes"]) == "icfg-pedes"
    assert detect_person_format(generated["rstpreid"] / "data_captions.json") == "rstpreid"
    # The IRRA layout: root/<DatasetName>/annotation.json, found by name.
    assert len(load_person_dataset("RSTPReid", parent)) == (N_TRAIN + N_VAL + N_TEST) * PER_ID
    assert load_person_dataset("icfg", generated["icfg-pedes"] / "ICFG-PEDES.json").name == "icfg-pedes"
    with pytest.raises(ConfigError, match="several datasets"):
        detect_person_format(parent)
    with pytest.raises(DataError, match=r"reid_raw\.json.*ICFG-PEDES\.json.*data_captions\.json"):
        detect_person_format(tmp_path)
    with pytest.raises(ConfigError, match="unknown person-retrieval dataset 'market'"):
        load_person_dataset("market", generated["cuhk-pedes"])
    with pytest.raises(DataError, match="annotation file not found"):
        load_person_dataset("cuhk-pedes", generated["icfg-pedes"])
    # ICFG-PEDES under IRRA's README spelling.
    alt = tmp_path / "alt"
    alt.mkdir()
    (alt / "ICFG_PEDES.json").write_text((generated["icfg-pedes"] / "ICFG-PEDES.json").read_text())
    icfg = load_person_dataset(None, alt, image_root=generated["icfg-pedes"] / "imgs")
    assert len(icfg) == (N_TRAIN + N_TEST) * PER_ID


MALFORMED = [
    # (style, entry index, mutation, expected phrase)
    ("cuhk-pedes", 3, lambda e: e.pop("captions"), "missing key(s) 'captions'"),
    ("rstpreid", 2, lambda e: e.pop("img_path"), "missing key(s) 'img_path'"),
    ("cuhk-pedes", 1, lambda e: e.update(id="7"), "'id' must be an integer, got str '7'"),
    ("cuhk-pedes", 1, lambda e: e.update(id=True), "'id' must be an integer, got bool True"),
    ("icfg-pedes", 4, lambda e: e.update(id=-2), "'id' is negative (-2)"),
    ("cuhk-pedes", 0, lambda e: e.update(id=0), "ids are 1-based"),
    ("cuhk-pedes", 2, lambda e: e.update(captions=[]), "'captions' is an empty list"),
    ("rstpreid", 5, lambda e: e.update(captions="a man"), "'captions' must be a list of strings, got str"),
    ("cuhk-pedes", 2, lambda e: e.update(captions=["fine words", "   "]), "caption 1 is empty"),
    ("rstpreid", 2, lambda e: e.update(captions=["?!..", "ok"]), "caption 0 is empty (or punctuation only)"),
    ("icfg-pedes", 6, lambda e: e.update(captions=[5]), "caption 0 is a int"),
    ("cuhk-pedes", 7, lambda e: e.update(split="dev"), "'split' is 'dev', expected one of train, val, test"),
    ("icfg-pedes", 0, lambda e: e.update(split="val"), "'split' is 'val', expected one of train, test"),
    ("cuhk-pedes", 3, lambda e: e.update(file_path="/abs/x.jpg"), "must be a path relative to imgs/"),
    ("rstpreid", 3, lambda e: e.update(img_path=""), "'img_path' must be a non-empty string"),
]


@pytest.mark.parametrize(("style", "index", "mutate", "phrase"), MALFORMED)
def test_malformed_entry_is_named(generated: dict[str, Path], tmp_path: Path, style: str, index: int,
                                  mutate, phrase: str) -> None:
    entries = copy.deepcopy(_entries(generated, style))
    mutate(entries[index])
    with pytest.raises(DataError) as info:
        _load_variant(tmp_path, generated, style, entries)
    message = str(info.value)
    assert f"entry {index}: " in message and phrase in message
    assert "1 problem(s)" in message and "1 malformed entry" in message
    assert ANNOTATION_FILES[style] in message  # names the file


def test_non_object_entry_and_conflicts(generated: dict[str, Path], tmp_path: Path) -> None:
    entries = copy.deepcopy(_entries(generated, "cuhk-pedes"))
    entries[4] = ["not", "an", "object"]
    clash = copy.deepcopy(entries[0])
    clash["id"] += 5  # the same image under another identity
    entries.append(clash)
    with pytest.raises(DataError) as info:
        _load_variant(tmp_path, generated, "cuhk-pedes", entries)
    message = str(info.value)
    assert "entry 4: is a list, expected an object" in message
    assert f"entry {len(entries) - 1}: image '{entries[0]['file_path']}' is also listed by entry 0 with id" in message
    assert "2 problem(s)" in message


def test_many_problems_are_listed_and_counted(generated: dict[str, Path], tmp_path: Path) -> None:
    entries = copy.deepcopy(_entries(generated, "rstpreid"))
    for entry in entries[:25]:
        entry["split"] = "holdout"
    with pytest.raises(DataError) as info:
        _load_variant(tmp_path, generated, "rstpreid", entries)
    message = str(info.value)
    assert "25 problem(s)" in message and "... and 15 more" in message
    listed = re.findall(r"^  entry (\d+): ", message, flags=re.MULTILINE)
    assert listed == [str(i) for i in range(10)]


@pytest.mark.parametrize(("text", "phrase"), [
    ("{not json", "not valid JSON"),
    ('{"split": "train"}', "top level must be a JSON list"),
    ("[]", "annotation list is empty"),
])
def test_bad_annotation_file(tmp_path: Path, text: str, phrase: str) -> None:
    (tmp_path / "data_captions.json").write_text(text)
    with pytest.raises(DataError, match=re.escape(phrase)):
        load_person_dataset("rstpreid", tmp_path)


def test_missing_images_are_listed_by_path(generated: dict[str, Path], tmp_path: Path) -> None:
    entries = copy.deepcopy(_entries(generated, "icfg-pedes"))
    entries[2]["file_path"] = "train/9999/gone.jpg"  # a folder that does not exist
    entries[5]["file_path"] = entries[5]["file_path"].replace(".jpg", "_x.jpg")  # a file that does not exist
    entries[7]["captions"] = []
    with pytest.raises(DataError) as info:
        _load_variant(tmp_path, generated, "icfg-pedes", entries)
    message = str(info.value)
    imgs = (generated["icfg-pedes"] / "imgs").resolve()
    assert f"entry 2: image file missing: {imgs / 'train/9999/gone.jpg'}" in message
    assert f"entry 5: image file missing: {imgs / entries[5]['file_path']}" in message
    assert "entry 7: 'captions' is an empty list" in message
    assert "3 problem(s)" in message and "1 malformed entry, 2 missing images" in message
    assert "check the image folder" in message
    # Without the image check the two entries load (the caption problem alone is still refused).
    entries[7]["captions"] = ["a man"]
    root = _write_variant(tmp_path, "icfg-pedes", entries)
    assert len(load_person_dataset("icfg-pedes", root, image_root=imgs, check_images=False)) == len(entries)


def test_corrupt_image_is_named(generated: dict[str, Path], tmp_path: Path) -> None:
    source = load_person_dataset("cuhk-pedes", generated["cuhk-pedes"])
    good = Path(source[0].image_path)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all")
    truncated = tmp_path / "truncated.png"
    png = next(Path(r.image_path) for r in source if r.image_path.endswith(".png"))
    truncated.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    for bad in (garbage, truncated):
        with pytest.raises(DataError, match=re.escape(str(bad))):
            load_image(bad)
    with pytest.raises(DataError, match="image file not found"):
        load_image(tmp_path / "nope.jpg")
    assert load_image(good).mode == "RGB"
    with pytest.raises(DataError, match=r"2 unreadable image\(s\)") as info:
        verify_images([good, garbage, truncated])
    assert str(garbage) in str(info.value) and str(good) not in str(info.value)
    # Inside a torch dataset the error names the file too.
    pairs = build_train_pairs(source)
    zero = np.zeros(1, np.int64)
    broken = type(pairs)((str(garbage),), zero, ("a man",), zero, zero)
    with pytest.raises(DataError, match=re.escape(str(garbage))):
        PairDataset(broken, ImageTransform.eval((8, 4)))[0]


# ---------------------------------------------------------------------------------------------- captions
def _rasa_pre_caption(caption: str, max_words: int = 50) -> str:
    """RaSa's dataset/utils.py pre_caption, re-typed here as the reference."""
    caption = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower()).replace("-", " ").replace("/", " ")
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def test_clean_caption_exact() -> None:
    text = "The man's shirt is RED-and-white, (very) nice!  "
    assert clean_caption(text) == "the mans shirt is red and white very nice"
    assert clean_caption('A/B  "quoted" text*#~;: here.') == "a b quoted text here"
    assert clean_caption("  Line one.\n\tLine   two  ") == "line one line two"
    assert clean_caption("one two three four", 2) == "one two"
    assert clean_caption("one two three four", None) == "one two three four"
    assert clean_caption("?!.,") == ""
    with pytest.raises(ConfigError):
        clean_caption("x", 0)


def test_clean_caption_matches_rasa(generated: dict[str, Path]) -> None:
    texts = [c for style in STYLES for r in load_person_dataset(style, generated[style]) for c in r.captions]
    texts += ["A woman--wearing a T-shirt/blouse (pink); she's tall!", "x " * 80]
    for text in texts:
        assert clean_caption(text, 50) == _rasa_pre_caption(text, 50)
        assert clean_caption(text, 7) == _rasa_pre_caption(text, 7)


# ---------------------------------------------------------------------------------------------- transforms
def test_transform_normalisation_by_hand() -> None:
    pixels = np.arange(4 * 2 * 3, dtype=np.uint8).reshape(4, 2, 3) * 10
    out = ImageTransform.eval(size=(4, 2))(pixels)
    assert out.shape == (3, 4, 2) and out.dtype == torch.float32
    for c in range(3):
        expected = (pixels[:, :, c] / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        np.testing.assert_allclose(out[c].numpy(), expected, rtol=0, atol=1e-5)
    # PIL input gives the same result.
    assert torch.equal(ImageTransform.eval(size=(4, 2))(Image.fromarray(pixels)), out)


def test_transform_resize_matches_pil_bicubic() -> None:
    # A smooth image: PIL rounds and clips between its two 1-D passes, which only matters for
    # high-frequency content (there bicubic overshoots), not for photographs.
    yy, xx = np.mgrid[0:48, 0:20]
    waves = [np.sin(yy / 5.0 + c) * np.cos(xx / 4.0 - c) for c in range(3)]
    pixels = np.round(127 + 100 * np.stack(waves, axis=-1)).astype(np.uint8)
    image = Image.fromarray(pixels)
    plain = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    for size in ((24, 10), (96, 32), (30, 16)):
        out = ImageTransform.eval(size=size, **plain)(image)
        assert out.shape == (3, *size)
        reference = np.asarray(image.resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32) / 255.0
        assert np.abs(out.permute(1, 2, 0).numpy() - reference).max() <= 2.5 / 255
        assert out.min() >= 0.0 and out.max() <= 1.0  # bicubic overshoot is clamped
    constant = np.full((40, 12, 3), (200, 100, 50), dtype=np.uint8)
    out = ImageTransform.eval(size=(384, 128))(constant)
    expected = (np.array([200, 100, 50]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    # numpy, not torch.testing: its first call costs a second of lazy imports.
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-4, rtol=0)
    assert float(out.std(dim=(1, 2)).max()) < 1e-4


def test_transform_flip_is_seeded() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    plain = ImageTransform.eval(size=(8, 6))(pixels)
    assert torch.equal(ImageTransform.train(size=(8, 6), flip_prob=1.0)(pixels), plain.flip(-1))
    flip = ImageTransform.train(size=(8, 6), flip_prob=0.5)
    decisions = []
    for seed in range(200):
        a = flip(pixels, np.random.default_rng(seed))
        assert torch.equal(a, flip(pixels, np.random.default_rng(seed)))  # same seed, same decision
        assert torch.equal(a, plain) or torch.equal(a, plain.flip(-1))
        decisions.append(torch.equal(a, plain.flip(-1)))
    assert 60 < sum(decisions) < 140
    with pytest.raises(DataError, match="uint8"):
        flip(pixels.astype(np.float32))
    with pytest.raises(ConfigError):
        ImageTransform(size=(0, 4))
    with pytest.raises(ConfigError):
        ImageTransform(flip_prob=1.5)


def test_pair_dataset_augmentation_is_epoch_deterministic(generated: dict[str, Path]) -> None:
    pairs = load_person_dataset("rstpreid", generated["rstpreid"]).train_pairs()
    transform = ImageTransform.train(size=(32, 16))
    a, b = PairDataset(pairs, transform, seed=3), PairDataset(pairs, transform, seed=3)
    unflipped = PairDataset(pairs, ImageTransform.eval(size=(32, 16)))
    changed = 0
    for i in range(12):
        assert torch.equal(a[i].image, b[i].image)
        first = a[i].image
        a.set_epoch(1)
        second = a[i].image
        a.set_epoch(0)
        base = unflipped[i].image
        assert torch.equal(first, base) or torch.equal(first, base.flip(-1))
        changed += not torch.equal(first, second)
    assert changed > 0  # another epoch draws other flips


# ---------------------------------------------------------------------------------------------- pairs + samplers
def test_train_pairs_and_hidden_target(generated: dict[str, Path]) -> None:
    dataset = load_person_dataset("cuhk-pedes", generated["cuhk-pedes"])
    train = dataset.split("train")
    pairs = build_train_pairs(dataset)
    assert len(pairs) == train.num_captions == N_TRAIN * PER_ID * 2
    assert pairs.num_identities == N_TRAIN and set(pairs.person_ids.tolist()) == set(range(N_TRAIN))
    for i in range(len(pairs)):
        record = train[int(pairs.image_index[i])]
        assert pairs.image_paths[pairs.image_index[i]] == record.image_path
        assert pairs.captions[i] in [clean_caption(c) for c in record.captions]
        assert pairs.original_ids[pairs.person_ids[i]] == record.person_id
    # Val ids start after train ids: re-indexing makes them contiguous from 0.
    val_pairs = build_train_pairs(dataset, "val")
    assert val_pairs.original_ids.tolist() == list(range(N_TRAIN, N_TRAIN + N_VAL))
    assert set(val_pairs.person_ids.tolist()) == {0, 1}

    target = build_train_pairs(dataset, hide_ids=True)
    assert target.captions == pairs.captions and np.array_equal(target.image_index, pairs.image_index)
    assert target.ids_hidden and target.num_identities == 0 and target.original_ids.size == 0
    assert (target.person_ids == -1).all() and (target.image_person_ids == -1).all()
    assert (pairs.without_ids().person_ids == -1).all()
    sample = PairDataset(target, ImageTransform.eval((16, 8)))[5]
    assert sample.person_id == -1 and sample.index == 5
    with pytest.raises(DataError, match="unknown ids"):
        IdentityBalancedBatchSampler(target.person_ids, p=2, k=2)
    with pytest.raises(DataError, match="no records in split 'train'"):
        build_train_pairs(dataset.split("test"))


def _check_balanced(batches: list[list[int]], ids: np.ndarray, p: int, k: int) -> None:
    for batch in batches:
        block = ids[np.asarray(batch)].reshape(p, k)
        assert (block == block[:, :1]).all(), "each K-block is one identity"
        assert np.unique(block[:, 0]).size == p, "P distinct identities"


def test_identity_balanced_sampler_invariants() -> None:
    counts = [1, 2, 3, 4, 5, 7, 9, 1, 1, 6, 2, 11]  # includes identities with fewer than K pairs
    ids = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
    p, k = 4, 3
    sampler = IdentityBalancedBatchSampler(ids, p=p, k=k, seed=7)
    assert sampler.batch_size == 12
    epochs = [sampler.batches(e) for e in range(4)]
    for batches in epochs:
        assert len(batches) == len(sampler)
        assert all(len(b) == p * k for b in batches)
        _check_balanced(batches, ids, p, k)
        seen = np.concatenate(batches)
        assert set(seen.tolist()) == set(range(ids.size)), "every pair at least once per epoch"
    assert epochs[0] == sampler.batches(0) == IdentityBalancedBatchSampler(ids, p=p, k=k, seed=7).batches(0)
    assert epochs[0] != epochs[1]
    assert IdentityBalancedBatchSampler(ids, p=p, k=k, seed=8).batches(0) != epochs[0]
    sampler.set_epoch(2)
    assert list(sampler) == epochs[2]
    # An identity with a single pair is sampled with replacement: its block repeats that pair.
    single = int(np.flatnonzero(ids == 0)[0])
    blocks = [b[i:i + k] for b in epochs[0] for i in range(0, p * k, k) if ids[b[i]] == 0]
    assert blocks and all(block == [single] * k for block in blocks)


def test_identity_balanced_sampler_skewed_and_errors() -> None:
    ids = np.concatenate([np.zeros(40, np.int64), np.arange(1, 6)])  # one identity dominates
    sampler = IdentityBalancedBatchSampler(ids, p=3, k=2, seed=0)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == 20  # the dominant identity needs 20 chunks, one per batch
    _check_balanced(batches, ids, 3, 2)
    assert set(np.concatenate(batches).tolist()) == set(range(ids.size))
    with pytest.raises(ConfigError, match="only 6 identities"):
        IdentityBalancedBatchSampler(ids, p=7, k=2)
    with pytest.raises(ConfigError, match="positive integer"):
        IdentityBalancedBatchSampler(ids, p=0, k=2)
    with pytest.raises(ConfigError, match="seed"):
        IdentityBalancedBatchSampler(ids, p=2, k=2, seed=-1)


def test_shuffled_batch_sampler() -> None:
    sampler = ShuffledBatchSampler(23, batch_size=5, seed=4)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == 4 and all(len(b) == 5 for b in batches)
    flat = np.concatenate(batches)
    assert np.unique(flat).size == 20 and flat.max() < 23
    assert batches == ShuffledBatchSampler(23, 5, seed=4).batches(0) and batches != sampler.batches(1)
    keep = ShuffledBatchSampler(23, 5, seed=4, drop_last=False)
    assert len(keep) == 5 and sorted(np.concatenate(keep.batches(0)).tolist()) == list(range(23))
    with pytest.raises(ConfigError, match="larger than the 3 items"):
        ShuffledBatchSampler(3, batch_size=5)


def test_dataloader_with_balanced_sampler(generated: dict[str, Path]) -> None:
    pairs = load_person_dataset("icfg-pedes", generated["icfg-pedes"]).train_pairs()
    sampler = IdentityBalancedBatchSampler(pairs.person_ids, p=4, k=2, seed=1)
    loader = DataLoader(PairDataset(pairs, ImageTransform.train((24, 12)), seed=1), batch_sampler=sampler)
    batch = next(iter(loader))
    assert batch.image.shape == (8, 3, 24, 12) and batch.image.dtype == torch.float32
    assert len(batch.caption) == 8 and all(isinstance(c, str) for c in batch.caption)
    ids = batch.person_id.numpy().reshape(4, 2)
    assert (ids[:, 0] == ids[:, 1]).all() and np.unique(ids[:, 0]).size == 4
    assert np.array_equal(pairs.person_ids[batch.index.numpy()], batch.person_id.numpy())


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("style", STYLES)
def test_eval_view_counts(generated: dict[str, Path], style: str) -> None:
    dataset = load_person_dataset(style, generated[style])
    view = build_eval_view(dataset)
    assert view.num_gallery == N_TEST * PER_ID
    assert view.num_queries == N_TEST * PER_ID * CAPTIONS_PER_IMAGE[style]
    assert np.array_equal(view.image_person_ids[view.caption_image], view.caption_person_ids)
    assert (view.relevant_counts() == PER_ID).all()
    assert set(view.image_person_ids.tolist()) == set(dataset.split("test").person_ids.tolist())
    assert all(c == clean_caption(c) for c in view.captions)
    queries = CaptionDataset.queries(view)
    assert len(queries) == view.num_queries and queries[3].person_id == view.caption_person_ids[3]
    gallery = PersonImageDataset.gallery(view, ImageTransform.eval((16, 8)))
    item = gallery[2]
    assert item.image.shape == (3, 16, 8) and item.person_id == view.image_person_ids[2] and item.index == 2


def test_eval_view_merges_duplicate_images(generated: dict[str, Path], tmp_path: Path) -> None:
    entries = copy.deepcopy(_entries(generated, "rstpreid"))
    test = [e for e in entries if e["split"] == "test"]
    extra = copy.deepcopy(test[0])
    extra["captions"] = ["Another caption of the same image, by a third annotator."]
    entries.append(extra)
    root = _write_variant(tmp_path, "rstpreid", entries)
    view = load_person_dataset("rstpreid", root, image_root=generated["rstpreid"] / "imgs").eval_view()
    assert view.num_gallery == len(test) and view.num_queries == 2 * len(test) + 1
    assert (view.caption_image == 0).sum() == 3

