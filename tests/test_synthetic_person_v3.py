"""Synthetic person datasets, protocol v3: v2 output unchanged, captions naming a random subset of the
attributes (so that many identities fit a caption), and per-dataset words the generic corpus never uses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import crossret.data.synthetic_person as synth
from crossret.data.person import clean_caption, load_person_dataset
from crossret.data.synthetic_person import (
    GENERIC_STYLE,
    STYLES,
    V3_BASE_WORDS,
    V3_SPECIFIC_WORDS,
    caption_uniqueness,
    generate_person_dataset,
    generate_person_datasets,
    generate_pretraining_corpus,
    sample_identities,
    v3_image_captions,
    v3_words,
)
from crossret.errors import ConfigError

# Digests of the v2 output, made with the generator as it was before protocol v3 existed (same arguments
# as below): protocol v2 must stay byte-identical. JPEG bytes depend on the Pillow/libjpeg build; these are
# this project's pinned versions.
V2_DIGESTS = {
    "cuhk-pedes": "6a103ed1c0a47bb3b630be53a7ee8bbc484dbedd8dcae6b5114f15c3790baa5b",
    "icfg-pedes": "46c369f85af9e2d3d4523347d3376e75ca084b74ed531601c134446323dabdbe",
    "rstpreid": "51303615df230f44123ab2fb7a95a96da612401202de1fafeb34606882d4d0cc",
    GENERIC_STYLE: "7726172be301d019341c3d00df2a3210276d91d5643bedf56bac1be45034e28c",
}
V2_ARGS = {"n_train_ids": 6, "n_val_ids": 2, "n_test_ids": 3, "images_per_id": 2, "seed": 5, "image_size": (32, 16)}
V2_GENERIC_ARGS = {"n_ids": 8, "images_per_id": 2, "n_test_ids": 2, "seed": 3, "image_size": (32, 16)}


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _words(captions: list[str]) -> set[str]:
    return {w for c in captions for w in clean_caption(c, None).split()}


@pytest.mark.parametrize("explicit", [False, True])
def test_v2_output_is_byte_identical_to_before_v3(tmp_path: Path, explicit: bool) -> None:
    extra = {"protocol": "v2"} if explicit else {}
    paths = generate_person_datasets(tmp_path / "d", **V2_ARGS, **extra)
    digests = {style: _tree_digest(path) for style, path in paths.items()}
    generic = generate_pretraining_corpus(tmp_path / "g", **V2_GENERIC_ARGS, **extra)
    digests[GENERIC_STYLE] = _tree_digest(generic)
    assert digests == V2_DIGESTS


@pytest.mark.parametrize("style", STYLES)
def test_v3_same_images_as_v2_own_captions_reproducible_without_rendering(tmp_path: Path, style: str) -> None:
    args = {"n_train_ids": 5, "n_test_ids": 4, "images_per_id": 2, "seed": 9, "image_size": (32, 16)}
    v2 = generate_person_dataset(style, tmp_path / "v2", **args)
    v3 = generate_person_dataset(style, tmp_path / "v3", protocol="v3", **args)
    again = generate_person_dataset(style, tmp_path / "again", protocol="v3", **args)
    assert _tree_digest(v3) == _tree_digest(again)  # deterministic
    images = {p.relative_to(v2): p.read_bytes() for p in (v2 / "imgs").rglob("*") if p.is_file()}
    assert images == {p.relative_to(v3): p.read_bytes() for p in (v3 / "imgs").rglob("*") if p.is_file()}
    assert json.loads((v3 / ".crossret-synthetic").read_text())["protocol"] == "v3"
    assert "protocol" not in json.loads((v2 / ".crossret-synthetic").read_text())
    # The captions in the file are the ones v3_image_captions re-makes (pid, k from the file names' order).
    people = sample_identities(9, style, seed=9)
    dataset = load_person_dataset(style, v3)
    per_person: dict[int, int] = {}
    for record in dataset:
        k = per_person.get(record.person_id, 0)
        per_person[record.person_id] = k + 1
        expected = [text for text, _ in v3_image_captions(style, people[record.person_id], 9, record.person_id, k)]
        assert list(record.captions) == expected
    assert sorted(per_person.values()) == [2] * 9


@pytest.mark.parametrize("style", STYLES)
def test_v3_captions_name_a_true_subset_of_the_attributes(style: str) -> None:
    people = sample_identities(60, style, seed=1)
    words = v3_words(style)
    units_seen: set[int] = set()
    for pid, ident in enumerate(people):
        for k in range(2):
            for text, said in v3_image_captions(style, ident, 1, pid, k):
                assert all(getattr(ident, field) == value for field, value in said.items()), (text, said)
                units = {f.split("_")[0] for f in said}  # gender, hair, upper, lower, shoes, bag, hat
                units_seen.add(len(units))
                assert 2 <= len(units) <= 4 and len(units) < 7
                lowered = text.lower()
                for field in ("upper_colour", "lower_colour", "shoes_colour", "bag_colour", "hat_colour"):
                    if said.get(field):
                        assert any(w in lowered for w in words[str(said[field])]), (text, field)
                if "gender" in said:
                    assert any(w in lowered for w in words[ident.gender])
    assert units_seen >= {2, 3}


def test_v3_captions_fit_many_identities() -> None:
    stats = {style: caption_uniqueness(style, 100, 250, 4, seed=0) for style in STYLES}
    for style, s in stats.items():
        assert s["captions"] == 250 * 4 * synth._STYLES[style].captions_per_image
        assert s["unique"] < 0.6 and s["mean_fitting"] > 3.0, (style, s)
    # one identity in the split: every caption fits it alone
    assert caption_uniqueness("cuhk-pedes", 3, 1, 2, seed=0)["unique"] == 1.0
    with pytest.raises(ConfigError, match="no identities"):
        caption_uniqueness("rstpreid", 3, 0, 2)


def test_v3_uniqueness_matches_a_count_over_the_written_captions(tmp_path: Path) -> None:
    # Reference computed another way: identities of the split whose v3 captions could have said the same
    # attribute values, counted from the identities' keys in a dict (not by scanning per caption).
    args = {"n_train_ids": 4, "n_test_ids": 30, "images_per_id": 2, "seed": 2}
    got = caption_uniqueness("icfg-pedes", **args)
    people = sample_identities(34, "icfg-pedes", seed=2)[4:]
    fits = []
    for pid, ident in enumerate(people, start=4):
        for k in range(2):
            for _, said in v3_image_captions("icfg-pedes", ident, 2, pid, k):
                fields = sorted(said)
                index: dict[tuple[object, ...], int] = {}
                for p in people:
                    key = tuple(getattr(p, f) for f in fields)
                    index[key] = index.get(key, 0) + 1
                fits.append(index[tuple(said[f] for f in fields)])
    assert got["unique"] == pytest.approx(sum(f == 1 for f in fits) / len(fits))
    assert got["mean_fitting"] == pytest.approx(sum(fits) / len(fits))


def test_v3_lexicons_dataset_words_never_in_the_generic_corpus(tmp_path: Path) -> None:
    specific = {style: {w for words in V3_SPECIFIC_WORDS[style].values() for w in words} for style in STYLES}
    # Designed: the same five concepts in every style, pairwise disjoint words, none a base word.
    assert all(set(V3_SPECIFIC_WORDS[s]) == {"red", "blue", "green", "jacket", "backpack"} for s in STYLES)
    base = {w for words in V3_BASE_WORDS.values() for phrase in words for w in phrase.split()}
    for i, a in enumerate(STYLES):
        assert not specific[a] & base
        for b in STYLES[i + 1:]:
            assert not specific[a] & specific[b]
    # Measured on generated text: the generic corpus (rendered) and many dataset captions (not rendered).
    corpus = generate_pretraining_corpus(tmp_path / "g", n_ids=150, images_per_id=1, seed=0, image_size=(32, 16),
                                         protocol="v3")
    generic = _words([c for r in load_person_dataset(None, corpus) for c in r.captions])
    lexicon = base | {w for s in STYLES for w in specific[s]}
    assert {"red", "blue", "green", "jacket", "backpack"} <= generic and not generic & (lexicon - base)
    for style in STYLES:
        people = sample_identities(200, style, seed=0)
        vocab = _words([t for pid, p in enumerate(people) for t, _ in v3_image_captions(style, p, 0, pid, 0)])
        assert specific[style] <= vocab  # every own word is used ...
        assert not vocab & {"red", "blue", "green", "jacket", "backpack"}  # ... instead of the base word
        assert (vocab - generic) & lexicon == specific[style]  # and no other colour/garment word is new
        assert not vocab & set().union(*(specific[s] for s in STYLES if s != style))
    # A WordPiece vocabulary trained on the generic captions can spell every dataset word (no [UNK]):
    # all their letters occur in the generic corpus.
    letters = {ch for w in generic for ch in w}
    assert {ch for s in STYLES for w in specific[s] for ch in w} <= letters


def test_v3_generic_corpus_base_lexicon_and_every_attribute(tmp_path: Path) -> None:
    corpus = generate_pretraining_corpus(tmp_path / "g", n_ids=12, images_per_id=2, seed=4, image_size=(32, 16),
                                         protocol="v3")
    people = sample_identities(12, GENERIC_STYLE, seed=4)
    for record in load_person_dataset(None, corpus):
        ident = people[record.person_id]
        assert len(record.captions) == 2
        for caption in record.captions:
            assert "hair" in caption and any(f"{w} " in caption for w in V3_BASE_WORDS[ident.lower_colour])
            assert any(w in caption for w in (*V3_BASE_WORDS[ident.gender], *V3_BASE_WORDS["person"]))


def test_protocol_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown synthetic protocol"):
        generate_person_dataset("cuhk-pedes", tmp_path / "x", n_train_ids=2, protocol="v4")
    with pytest.raises(ConfigError, match="unknown synthetic protocol"):
        generate_pretraining_corpus(tmp_path / "y", n_ids=2, protocol="3")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_synth_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from _cli import cli

    args = ("--train-ids", 3, "--test-ids", 2, "--images-per-id", 1, "--seed", 4)
    code, _, stderr = cli(monkeypatch, capsys, "gckd", "synth", tmp_path / "v3", *args, "--protocol", "v3")
    assert code == 0, stderr
    people = sample_identities(5, "rstpreid", seed=4)
    dataset = load_person_dataset(None, tmp_path / "v3" / "RSTPReid")
    assert [list(r.captions) for r in dataset] == [
        [t for t, _ in v3_image_captions("rstpreid", people[pid], 4, pid, 0)] for pid in range(5)]
    code, _, stderr = cli(monkeypatch, capsys, "gckd", "synth", tmp_path / "v2", *args)  # default: v2
    assert code == 0, stderr
    assert "protocol" not in json.loads((tmp_path / "v2" / "CUHK-PEDES" / ".crossret-synthetic").read_text())
    code, _, stderr = cli(monkeypatch, capsys, "gckd", "synth", tmp_path / "bad", *args, "--protocol", "v9")
    assert code == 2 and "unknown synthetic protocol" in stderr and not (tmp_path / "bad").exists()


def _mutual_pairs_by_loops(score: list[list[float]]) -> list[tuple[int, int]]:
    """Mutual-nearest pairs of a score matrix, by explicit loops (reference)."""
    n_c, n_i = len(score), len(score[0])
    best_image = [max(range(n_i), key=lambda i, c=c: score[c][i]) for c in range(n_c)]
    best_caption = [max(range(n_c), key=lambda c, i=i: score[c][i]) for i in range(n_i)]
    return [(c, best_image[c]) for c in range(n_c) if best_caption[best_image[c]] == c]


def test_mutual_pair_precision_matches_loops_over_the_same_tie_breaks() -> None:
    rng = np.random.default_rng(3)
    fits = rng.random((30, 12)) < 0.3
    caption_ids, image_ids = rng.integers(0, 4, 30), rng.integers(0, 4, 12)
    got = synth.mutual_pair_precision(fits, caption_ids, image_ids, draws=5, seed=11)
    noise = np.random.default_rng(11)
    precision, pairs = [], []
    for _ in range(5):
        score = (fits + 1e-3 * noise.random(fits.shape)).tolist()
        mutual = _mutual_pairs_by_loops(score)
        pairs.append(len(mutual))
        precision.append(sum(caption_ids[c] == image_ids[i] for c, i in mutual) / len(mutual) if mutual else 0.0)
    assert got["precision"] == pytest.approx(float(np.mean(precision)), abs=1e-12)
    assert got["pairs"] == pytest.approx(float(np.mean(pairs)))


def test_mutual_pair_precision_is_one_when_captions_identify_and_falls_when_they_do_not() -> None:
    ids = np.repeat(np.arange(5), 2)  # 5 identities, 2 captions and 2 images each
    own = ids[:, None] == ids[None, :]
    assert synth.mutual_pair_precision(own, ids, ids)["precision"] == 1.0
    # identities 0 and 1 look alike (every caption of one fits the other): about half their pairs are wrong
    alike = own | (np.isin(ids, [0, 1])[:, None] & np.isin(ids, [0, 1])[None, :])
    mixed = synth.mutual_pair_precision(alike, ids, ids, draws=400)
    assert 0.6 + 0.5 * 0.4 - 0.1 < mixed["precision"] < 1.0
    with pytest.raises(ConfigError, match="fits must be"):
        synth.mutual_pair_precision(own[:, :3], ids, ids)


def test_v3_split_fits_agree_with_caption_uniqueness() -> None:
    args = {"n_train_ids": 30, "n_test_ids": 5, "images_per_id": 2, "seed": 4}
    fits, caption_ids, image_ids = synth.v3_split_fits("rstpreid", **args, split="train")
    assert fits.shape == (caption_ids.size, 30 * 2) and image_ids.tolist() == np.repeat(np.arange(30), 2).tolist()
    assert fits[np.arange(caption_ids.size), 2 * caption_ids].all()  # a caption fits its own identity
    stats = caption_uniqueness("rstpreid", **args, split="train")
    per_caption = fits.sum(axis=1) / 2  # identities a caption fits
    assert stats["mean_fitting"] == pytest.approx(per_caption.mean())
    assert stats["unique"] == pytest.approx(np.mean(per_caption == 1))
    with pytest.raises(ConfigError, match="no identities"):
        synth.v3_split_fits("rstpreid", 3, 0, 2, split="test")
