"""Synthetic person-retrieval datasets: the real formats, byte-identical for a seed, distinct
identities whose captions tell them apart, and a real domain shift between the three styles."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import crossret.data.synthetic_person as synth
from crossret.data.person import clean_caption, load_image, load_person_dataset
from crossret.data.synthetic_person import (
    ANNOTATION_FILES,
    STYLES,
    dataset_captions,
    generate_person_dataset,
    generate_person_datasets,
    sample_identities,
    write_wordpiece_corpus,
)
from crossret.errors import ConfigError

SMALL = {"n_train_ids": 8, "n_test_ids": 3, "images_per_id": 3, "image_size": (32, 16)}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def styles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("styles")
    return generate_person_datasets(root, n_train_ids=16, n_test_ids=4, images_per_id=3, seed=11, image_size=(48, 24))


@pytest.mark.parametrize("style", STYLES)
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, style: str) -> None:
    a = _tree(generate_person_dataset(style, tmp_path / "a", seed=3, **SMALL))
    b = _tree(generate_person_dataset(style, tmp_path / "b", seed=3, **SMALL))
    c = _tree(generate_person_dataset(style, tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert ANNOTATION_FILES[style] in a and ".crossret-synthetic" in a and len(a) == 2 + 11 * 3
    assert a[ANNOTATION_FILES[style]] != c[ANNOTATION_FILES[style]]
    images_a = {data for name, data in a.items() if name.startswith("imgs/")}
    images_c = {data for name, data in c.items() if name.startswith("imgs/")}
    assert len(images_a) == 33 and not images_a & images_c  # another seed: other people, other pixels
    # Nothing but the dataset folders is left in the parent (the temporary folders were renamed or removed).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_formats_as_the_real_files(styles: dict[str, Path]) -> None:
    cuhk = json.loads((styles["cuhk-pedes"] / "reid_raw.json").read_text())
    assert list(cuhk[0]) == ["split", "captions", "file_path", "processed_tokens", "id"]
    assert min(e["id"] for e in cuhk) == 1  # 1-based
    assert all(len(e["captions"]) == 2 and len(e["processed_tokens"]) == 2 for e in cuhk)
    assert all(e["file_path"].startswith(("cam_a/", "cam_b/")) for e in cuhk)
    assert {Path(e["file_path"]).suffix for e in cuhk} == {".jpg", ".png"}
    assert cuhk[0]["processed_tokens"][1] == clean_caption(cuhk[0]["captions"][1], None).split()

    icfg = json.loads((styles["icfg-pedes"] / "ICFG-PEDES.json").read_text())
    assert list(icfg[0]) == ["split", "captions", "file_path", "processed_tokens", "id"]
    assert min(e["id"] for e in icfg) == 0 and {e["split"] for e in icfg} == {"train", "test"}
    assert all(len(e["captions"]) == 1 for e in icfg)
    assert all(e["file_path"].startswith(f"{e['split']}/{e['id']:04d}/") for e in icfg)

    rstp = json.loads((styles["rstpreid"] / "data_captions.json").read_text())
    assert list(rstp[0]) == ["id", "img_path", "captions", "split"]
    assert min(e["id"] for e in rstp) == 0 and all(len(e["captions"]) == 2 for e in rstp)

    # Image sizes: base height, width scaled by the style's aspect factor.
    widths = {}
    for style, entries, key in (("cuhk-pedes", cuhk, "file_path"), ("icfg-pedes", icfg, "file_path"),
                                ("rstpreid", rstp, "img_path")):
        with Image.open(styles[style] / "imgs" / entries[0][key]) as image:
            assert image.height == 48 and image.mode == "RGB"
            widths[style] = image.width
    assert widths == {"cuhk-pedes": 24, "icfg-pedes": 20, "rstpreid": 28}


def test_identities_are_distinct_and_captions_identify_them(styles: dict[str, Path]) -> None:
    people = sample_identities(300, "icfg-pedes", seed=2)
    assert len({p.key() for p in people}) == 300
    assert sample_identities(300, "icfg-pedes", seed=2) == people
    for style in STYLES:
        dataset = load_person_dataset(style, styles[style])
        owner: dict[str, int] = {}
        for record in dataset:
            for caption in record.captions:
                assert owner.setdefault(caption, record.person_id) == record.person_id
        # Images of one identity differ (jitter), and so do their files.
        paths = [r.image_path for r in dataset if r.person_id == 0]
        assert len({Path(p).read_bytes() for p in paths}) == len(paths)


def test_captions_describe_the_rendered_colours(styles: dict[str, Path]) -> None:
    # The torso of the figure (figure centre) has the upper-garment colour named in the caption.
    people = sample_identities(20, "cuhk-pedes", seed=11)
    dataset = load_person_dataset("cuhk-pedes", styles["cuhk-pedes"])
    hits = 0
    for record in dataset.split("train"):
        ident = people[record.person_id]
        assert ident.upper_colour in record.captions[0]
        pixels = np.asarray(load_image(record.image_path), dtype=np.float64)
        h, w = pixels.shape[:2]
        torso = np.median(pixels[int(0.38 * h):int(0.44 * h), int(0.42 * w):int(0.58 * w)].reshape(-1, 3), axis=0)
        distances = {name: np.linalg.norm(torso - np.asarray(rgb)) for name, rgb in synth.COLOURS.items()}
        hits += min(distances, key=distances.get) == ident.upper_colour
    assert hits >= 0.7 * len(dataset.split("train"))


def test_styles_shift_images_and_captions(styles: dict[str, Path]) -> None:
    means, vocab, lengths = {}, {}, {}
    for style in STYLES:
        dataset = load_person_dataset(style, styles[style])
        means[style] = np.mean([np.asarray(load_image(r.image_path), np.float64).mean(axis=(0, 1)) for r in dataset],
                               axis=0)
        captions = dataset_captions(styles[style], ("train", "test"))
        vocab[style] = {w for c in captions for w in c.split()}
        lengths[style] = np.mean([len(c.split()) for c in captions])
    for i, a in enumerate(STYLES):
        for b in STYLES[i + 1:]:
            assert np.linalg.norm(means[a] - means[b]) > 25, (a, b, means)  # mean colour, 0..255 scale
            jaccard = len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
            assert jaccard < 0.7, (a, b, jaccard)
            assert len(vocab[a] - vocab[b]) >= 5 and len(vocab[b] - vocab[a]) >= 5
    assert means["icfg-pedes"].sum() < means["cuhk-pedes"].sum()  # dark subway vs bright indoor
    assert means["icfg-pedes"][2] > means["icfg-pedes"][0] and means["rstpreid"][0] > means["rstpreid"][2]  # tints
    assert lengths["icfg-pedes"] > lengths["cuhk-pedes"] > lengths["rstpreid"]  # verbose vs terse
    assert "gray" in vocab["cuhk-pedes"] and "gray" not in vocab["icfg-pedes"] and "grey" in vocab["icfg-pedes"]


def test_overwrite_and_failure_leave_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"
    generate_person_dataset("rstpreid", out, seed=1, **SMALL)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        generate_person_dataset("rstpreid", out, seed=2, **SMALL)
    before = _tree(out)
    generate_person_dataset("rstpreid", out, seed=2, overwrite=True, **SMALL)
    assert _tree(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (tmp_path / "empty").mkdir()
    generate_person_dataset("icfg-pedes", tmp_path / "empty", **SMALL)  # an empty folder is fine
    assert (tmp_path / "empty" / "ICFG-PEDES.json").is_file()

    calls = {"n": 0}
    real = synth._render

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "_render", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_person_dataset("cuhk-pedes", tmp_path / "broken", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty"]  # no partial folder, no temp


@pytest.mark.parametrize(("kwargs", "phrase"), [
    ({"style": "icfg-pedes", "n_val_ids": 2}, "no val split"),
    ({"style": "cuhk-pedes", "images_per_id": 0}, "images_per_id"),
    ({"style": "cuhk-pedes", "n_train_ids": 0, "n_test_ids": 0}, "empty"),
    ({"style": "market", "n_train_ids": 2}, "unknown person-retrieval dataset"),
    ({"style": "rstpreid", "image_size": (8, 4)}, "image_size"),
])
def test_generator_argument_errors(tmp_path: Path, kwargs: dict, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        generate_person_dataset(out_dir=tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_generation_speed(tmp_path: Path) -> None:
    start = time.perf_counter()
    generate_person_dataset("icfg-pedes", tmp_path / "big", n_train_ids=90, n_test_ids=10, images_per_id=4, seed=0)
    elapsed = time.perf_counter() - start
    assert len(load_person_dataset(None, tmp_path / "big")) == 400
    assert elapsed < 8.0, f"100 ids x 4 images took {elapsed:.1f} s"  # ~1 s unloaded; generous for shared CPUs


def test_captions_and_wordpiece_corpus(styles: dict[str, Path], tmp_path: Path) -> None:
    train = dataset_captions(styles["cuhk-pedes"])
    assert len(train) == 16 * 3 * 2 and all(c == c.lower() and "," not in c and "." not in c for c in train)
    raw = dataset_captions(styles["cuhk-pedes"], ("test",), clean=False)
    assert len(raw) == 4 * 3 * 2 and any("." in c for c in raw)
    with pytest.raises(ConfigError, match="unknown split"):
        dataset_captions(styles["cuhk-pedes"], ("dev",))
    corpus = write_wordpiece_corpus([styles["cuhk-pedes"], styles["rstpreid"]], tmp_path / "corpus.txt")
    lines = corpus.read_text().splitlines()
    assert lines == train + dataset_captions(styles["rstpreid"])
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train([str(corpus)], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    encoded = tokenizer.encode(lines[0])
    assert "[UNK]" not in encoded.tokens and len(encoded.tokens) >= len(lines[0].split())


def test_generic_pretraining_corpus(tmp_path: Path, styles: dict[str, Path]) -> None:
    kwargs = {"n_ids": 12, "images_per_id": 2, "n_test_ids": 3, "seed": 4, "image_size": (48, 24)}
    root = synth.generate_pretraining_corpus(tmp_path / "g", **kwargs)
    assert _tree(root) == _tree(synth.generate_pretraining_corpus(tmp_path / "g2", **kwargs))  # deterministic
    dataset = load_person_dataset(None, root)  # written in the CUHK-PEDES format, so the pipeline reads it
    assert dataset.name.lower().startswith("cuhk")
    assert len(dataset.split("train")) == 24 and len(dataset.split("test")) == 6
    people = sample_identities(15, synth.GENERIC_STYLE, seed=4)
    assert len({p.key() for p in people}) == 15
    openings = ("a photo of a", "a ", "an ", "picture: ", "street photo of a")
    for record in dataset:
        ident = people[record.person_id]
        assert len(record.captions) == 2
        for caption in record.captions:
            assert caption.startswith(openings)
            # every attribute is named, with one of the words any dataset uses for it
            words = synth._COLOUR_WORDS[synth.GENERIC_STYLE][ident.upper_colour]
            assert any(f"{w} " in caption for w in words), (caption, ident.upper_colour)
            assert "hair" in caption
    # The generic captions use the vocabulary of every dataset (ICFG's "grey", CUHK's "gray", RSTP's "tee" ...)
    # in a template of their own: no generic caption is a caption any dataset style could write.
    vocab = {w for r in dataset for c in r.captions for w in clean_caption(c, None).split()}
    dataset_vocab = {w for s in STYLES for c in dataset_captions(styles[s], ("train", "test"))
                     for w in c.split()}
    assert {"photo", "picture"} <= vocab and not {"photo", "picture"} & dataset_vocab
    # Random rendering styles: the background (top-left corner) varies far more across generic images
    # than across one dataset's images.
    def corner_spread(ds: object) -> float:
        corners = [np.asarray(load_image(r.image_path), np.float64)[:4, :4].mean(axis=(0, 1)) for r in ds]
        return float(np.mean(np.std(corners, axis=0)))
    assert corner_spread(dataset) > 2 * max(corner_spread(load_person_dataset(s, styles[s])) for s in STYLES)
    with pytest.raises(ConfigError, match="n_ids"):
        synth.generate_pretraining_corpus(tmp_path / "bad", n_ids=0)


def test_overwrite_replaces_only_a_synthetic_dataset_crossret_wrote(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "reid_raw.json").write_text("my real annotations")
    for overwrite in (False, True):  # a user's folder: refused, and untouched, with or without overwrite
        with pytest.raises(ConfigError, match="mine"):
            generate_person_dataset("cuhk-pedes", mine, seed=3, overwrite=overwrite, **SMALL)
        assert sorted(p.name for p in mine.iterdir()) == ["reid_raw.json"]
        assert (mine / "reid_raw.json").read_text() == "my real annotations"
    ours = generate_person_dataset("cuhk-pedes", tmp_path / "ours", seed=3, **SMALL)
    with pytest.raises(ConfigError, match="not empty"):
        generate_person_dataset("cuhk-pedes", ours, seed=4, **SMALL)
    before = _tree(ours)
    after = _tree(generate_person_dataset("cuhk-pedes", ours, seed=4, overwrite=True, **SMALL))
    assert after[ANNOTATION_FILES["cuhk-pedes"]] != before[ANNOTATION_FILES["cuhk-pedes"]]
