"""Synthetic text-to-image person-retrieval datasets, written in the real CUHK-PEDES, ICFG-PEDES and
RSTPReid formats (json + ``imgs/``), for end-to-end CPU tests and benchmarks.

An identity is a combination of visible attributes (gender, hair length and colour, upper garment
type and colour, lower garment type and colour, shoes colour, bag type and colour, hat and its
colour); identities of one dataset are pairwise distinct in these attributes. Every image renders
the identity as a small pedestrian-like figure (head, hair, torso, arms, legs, shoes, optional bag
and hat) with per-image jitter (position, scale, pose, bag side, brightness, noise). Captions are
filled from attribute templates and mention every attribute, so text identifies the person.

Each dataset has its own **style**, so that there is a domain shift between them as between the
real datasets:

==========  ==================================  ===========================================  ========
style       images                              captions                                     per img
==========  ==================================  ===========================================  ========
cuhk-pedes  light indoor wall/floor, neutral,   two annotators, mid-length ("A woman with    2
            sharp, jpg and png, base width      long brown hair is wearing ..."), US
                                                spelling ("gray")
icfg-pedes  dark blue subway tiles, cold tint,  one long caption, bottom-up order ("The      1
            blurred, dark outline, narrower     male is wearing a pair of ... sneakers, ..."),
                                                UK spelling ("grey"), own garment words
rstpreid    outdoor foliage + road, warm tint,  terse, comma-separated fragments, own        2
            low contrast, noisy, wider          synonyms ("tee", "rucksack", "lady")
==========  ==================================  ===========================================  ========

:func:`generate_person_dataset` is deterministic: the same arguments give byte-identical files.

**Generic pre-training corpus.** The real GCKD pipeline starts from ALBEF weights pre-trained on 14M
generic image–text pairs: a model that already grounds colour and garment words in pixels before it
sees any person-search dataset. A tiny model trained from scratch on one synthetic dataset has no
such prior and transfers nothing. :func:`generate_pretraining_corpus` writes the analogue: a large,
*style-less* corpus (written in the CUHK-PEDES file format so the pipeline reads it) where every image
has a random background, tint, contrast, blur and noise, and every caption uses a fourth, web alt-text
like template ("a photo of a lady in a navy tee, ...") with words drawn from all the datasets'
synonyms. It teaches word–pixel grounding, not any dataset's rendering or sentence style, so the
source → target shift (templates, word order, rendering) remains.

**Protocol v3** (``protocol="v3"``; the default ``"v2"`` output is unchanged, byte for byte). The
images are the same; the captions change so that the stand-in can measure adaptation:

* a caption names a random subset of the identity's attribute groups (gender, hair, upper garment,
  lower garment, shoes, bag, hat: 2-4 of them for CUHK-PEDES, 2-4 for ICFG-PEDES, 2-3 for RSTPReid),
  sometimes only in part ("a red top", "long hair"), in one of several sentence templates with
  synonyms and varied order, so that several identities of a split fit one caption
  (:func:`caption_uniqueness` measures how many);
* each dataset names five concepts (red, blue, green, jacket, backpack) with words of its own
  (:data:`V3_SPECIFIC_WORDS`: "crimson" / "maroon" / "scarlet" for the same rendered red), the
  other concepts with the shared base lexicon (:data:`V3_BASE_WORDS`);
* the generic corpus uses the base lexicon only, so generic pre-training grounds "red" but none of
  the datasets' own words, and a source model has never seen the target's words for those concepts.

The v3 captions of an image come from a seeded stream of their own (:func:`v3_image_captions`),
independent of the rendering, so what each caption says (:data:`Mentions`) can be re-made without
rendering.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossret.data.person import SPLIT_NAMES, canonical_person_format, clean_caption, load_person_dataset
from crossret.errors import ConfigError
from crossret.extras import missing_extra
from crossret.storage.atomic import umask as _umask
from crossret.storage.atomic import write_text_atomic

try:
    from PIL import Image
except ImportError as exc:  # the 'gckd' extra is not installed
    raise missing_extra("gckd", "PIL", exc) from exc

__all__ = [
    "ANNOTATION_FILES",
    "DATASET_DIRS",
    "GENERIC_STYLE",
    "PROTOCOLS",
    "STYLES",
    "V3_BASE_WORDS",
    "V3_SPECIFIC_WORDS",
    "Identity",
    "Mentions",
    "caption_uniqueness",
    "dataset_captions",
    "generate_person_dataset",
    "generate_person_datasets",
    "generate_pretraining_corpus",
    "mutual_pair_precision",
    "sample_identities",
    "v3_image_captions",
    "v3_split_fits",
    "v3_words",
    "write_wordpiece_corpus",
]

STYLES: tuple[str, ...] = ("cuhk-pedes", "icfg-pedes", "rstpreid")
GENERIC_STYLE = "generic"  # the pre-training corpus (see the module docstring); written in the CUHK-PEDES format
ANNOTATION_FILES = {"cuhk-pedes": "reid_raw.json", "icfg-pedes": "ICFG-PEDES.json", "rstpreid": "data_captions.json"}
DATASET_DIRS = {"cuhk-pedes": "CUHK-PEDES", "icfg-pedes": "ICFG-PEDES", "rstpreid": "RSTPReid"}

# ---------------------------------------------------------------------------------------------- attributes
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30), "white": (236, 236, 232), "gray": (128, 128, 132), "red": (200, 32, 36),
    "blue": (36, 72, 190), "green": (40, 140, 62), "yellow": (232, 202, 44), "brown": (118, 74, 40),
    "pink": (236, 140, 172), "purple": (118, 50, 150), "orange": (240, 128, 32),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (22, 18, 18), "brown": (98, 58, 28), "blond": (222, 190, 110), "gray": (160, 160, 160),
}
SKIN_TONES: tuple[tuple[int, int, int], ...] = ((234, 196, 166), (198, 150, 112), (140, 96, 66))
_DARK = ("black", "gray", "blue", "brown")


@dataclass(frozen=True)
class Identity:
    """The visible attributes of one synthetic person (``skin`` is rendered but never described)."""

    gender: str  # male | female
    hair_length: str  # short | long
    hair_colour: str
    upper_type: str  # tshirt (short sleeves) | shirt (long sleeves) | jacket (long sleeves, open front)
    upper_colour: str
    lower_type: str  # trousers | shorts | skirt
    lower_colour: str
    shoes_colour: str
    bag: str  # none | backpack | handbag
    bag_colour: str  # "" without a bag
    hat: bool
    hat_colour: str  # "" without a hat
    skin: int = 0

    def key(self) -> tuple[object, ...]:
        """The attributes the captions describe; identities are distinct in this key."""
        return (self.gender, self.hair_length, self.hair_colour, self.upper_type, self.upper_colour,
                self.lower_type, self.lower_colour, self.shoes_colour, self.bag, self.bag_colour, self.hat,
                self.hat_colour)


def _pick(rng: np.random.Generator, options: Sequence[str], weights: Sequence[float] | None = None) -> str:
    if weights is None:
        return options[int(rng.integers(len(options)))]
    w = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _sample_identity(rng: np.random.Generator, style: str) -> Identity:
    names = tuple(COLOURS)
    # Colour priors differ per dataset (ICFG/RSTP come from MSMT17, winter clothes: darker), a label shift.
    dark_weight = {"cuhk-pedes": 1.0, "icfg-pedes": 3.0, "rstpreid": 1.8, GENERIC_STYLE: 1.5}[style]
    weights = [dark_weight if c in _DARK else 1.0 for c in names]
    gender = _pick(rng, ("male", "female"))
    long_hair = rng.random() < (0.75 if gender == "female" else 0.12)
    lower_types = ("trousers", "shorts", "skirt") if gender == "female" else ("trousers", "shorts")
    lower_weights = (0.5, 0.2, 0.3) if gender == "female" else (0.75, 0.25)
    bag = _pick(rng, ("none", "backpack", "handbag"), (0.4, 0.3, 0.3))
    hat = bool(rng.random() < 0.25)
    return Identity(
        gender=gender,
        hair_length="long" if long_hair else "short",
        hair_colour=_pick(rng, tuple(HAIR_COLOURS), (0.45, 0.3, 0.15, 0.1)),
        upper_type=_pick(rng, ("tshirt", "shirt", "jacket")),
        upper_colour=_pick(rng, names, weights),
        lower_type=_pick(rng, lower_types, lower_weights),
        lower_colour=_pick(rng, names, weights),
        shoes_colour=_pick(rng, ("black", "white", "gray", "brown", "red", "blue")),
        bag=bag,
        bag_colour=_pick(rng, names, weights) if bag != "none" else "",
        hat=hat,
        hat_colour=_pick(rng, names, weights) if hat else "",
        skin=int(rng.integers(len(SKIN_TONES))),
    )


def sample_identities(n: int, style: str = "cuhk-pedes", seed: int = 0) -> list[Identity]:
    """``n`` identities with pairwise distinct caption-visible attributes (deterministic for a seed)."""
    style = GENERIC_STYLE if style == GENERIC_STYLE else _check_style(style)
    rng = np.random.default_rng([int(seed), _style_index(style), 1])
    seen: set[tuple[object, ...]] = set()
    out: list[Identity] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:  # cannot happen for realistic n; guards an endless loop
            raise ConfigError(f"could not draw {n} distinct identities; lower the number of identities")
        ident = _sample_identity(rng, style)
        if ident.key() not in seen:
            seen.add(ident.key())
            out.append(ident)
    return out


# ---------------------------------------------------------------------------------------------- styles
@dataclass(frozen=True)
class _Style:
    width_factor: float  # image width = round(base width * factor): the datasets' aspect ratios differ
    wall: tuple[float, float, float]
    floor: tuple[float, float, float]
    horizon: float  # wall/floor boundary as a fraction of the height
    texture: str  # none | stripes | blotches
    texture_amp: float
    tint: tuple[float, float, float]
    contrast: float
    noise: float
    blur: int  # passes of a [1, 2, 1] / 4 blur
    outline: bool
    bg_jitter: float  # per-image (camera) shift of the background colour
    captions_per_image: int
    extensions: tuple[str, ...]  # image file types, cycled by camera


_STYLES: dict[str, _Style] = {
    "cuhk-pedes": _Style(1.0, (0.80, 0.78, 0.74), (0.62, 0.60, 0.56), 0.72, "none", 0.0, (1.0, 1.0, 1.0), 1.0,
                         0.02, 0, False, 0.06, 2, (".jpg", ".png")),
    "icfg-pedes": _Style(0.85, (0.22, 0.25, 0.34), (0.34, 0.34, 0.39), 0.66, "stripes", 0.08, (0.86, 0.95, 1.14),
                         1.1, 0.035, 1, True, 0.03, 1, (".jpg",)),
    "rstpreid": _Style(1.15, (0.40, 0.55, 0.34), (0.52, 0.50, 0.47), 0.60, "blotches", 0.10, (1.12, 1.0, 0.80),
                       0.78, 0.05, 0, False, 0.08, 2, (".jpg",)),
}


def _style_index(style: str) -> int:
    """Stream index of a style in the seeded generators (the generic corpus comes after the datasets)."""
    return len(STYLES) if style == GENERIC_STYLE else STYLES.index(style)


def _random_style(rng: np.random.Generator) -> _Style:
    """A rendering style drawn at random for one image of the generic corpus: any wall/floor colour,
    texture, tint, contrast, blur and noise in (and around) the ranges the three dataset styles span."""
    wall = tuple(float(v) for v in rng.uniform(0.15, 0.9, 3))
    floor = tuple(float(v) for v in rng.uniform(0.25, 0.7, 3))
    tint = tuple(float(v) for v in rng.uniform(0.82, 1.18, 3))
    return _Style(1.0, wall, floor, float(rng.uniform(0.55, 0.78)),  # type: ignore[arg-type]
                  _pick(rng, ("none", "stripes", "blotches")), float(rng.uniform(0.0, 0.12)), tint,  # type: ignore[arg-type]
                  float(rng.uniform(0.75, 1.15)), float(rng.uniform(0.01, 0.06)), int(rng.integers(2)),
                  bool(rng.random() < 0.3), 0.05, 2, (".jpg",))


def _check_style(style: str) -> str:
    name = canonical_person_format(style)
    if name not in STYLES:  # pragma: no cover - canonical_person_format only knows STYLES
        raise ConfigError(f"unknown style {style!r}")
    return name


# ---------------------------------------------------------------------------------------------- rendering
def _rgb(colour: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) / 255.0


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication (slices, not np.pad: this runs per image)."""
    for axis in (0, 1):
        x = np.moveaxis(img, axis, 0)
        out = x * 0.5
        out[1:] += x[:-1] * 0.25
        out[:-1] += x[1:] * 0.25
        out[0] += x[0] * 0.25
        out[-1] += x[-1] * 0.25
        img = np.moveaxis(out, 0, axis)
    return img


def _background(style: _Style, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    h, w = yy.shape[0], xx.shape[1]
    jitter = rng.uniform(-style.bg_jitter, style.bg_jitter, 3).astype(np.float32)
    wall = np.asarray(style.wall, dtype=np.float32) + jitter
    floor = np.asarray(style.floor, dtype=np.float32) + jitter
    horizon = (style.horizon + rng.uniform(-0.05, 0.05)) * h
    t = np.clip((yy - horizon) / (0.08 * h) + 0.5, 0.0, 1.0)[..., None]  # (h, 1, 1) soft horizon
    bg = np.broadcast_to(wall * (1 - t) + floor * t, (h, w, 3)).copy()
    if style.texture == "stripes":  # tiled wall: vertical stripes of 2 px
        phase = int(rng.integers(4))
        stripes = (((xx.astype(np.int64) + phase) // 2) % 2 - 0.5).astype(np.float32)
        bg += style.texture_amp * stripes[..., None] * (1 - t)
    elif style.texture == "blotches":  # foliage: blocky low-frequency noise above the horizon
        cell = 6
        coarse = rng.normal(0.0, 1.0, (h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        up = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:h, :w]
        bg += style.texture_amp * _blur(up) * (1 - t)
    return bg


def _render(ident: Identity, style: _Style, rng: np.random.Generator, height: int, width: int,
            walking: bool, side: int) -> np.ndarray:
    """One image of ``ident`` as uint8 (height, width, 3). Shapes are boolean masks over the pixel grid."""
    yy = (np.arange(height, dtype=np.float32) + 0.5)[:, None]
    xx = (np.arange(width, dtype=np.float32) + 0.5)[None, :]
    img = _background(style, rng, yy, xx)
    fh = height * rng.uniform(0.80, 0.92)  # figure height in pixels: the unit of all shape coordinates
    top = rng.uniform(0.04 * height, max(0.04 * height, 0.99 * height - fh))
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    yn = (yy - top) / fh  # normalised figure coordinates
    xn = (xx - cx) / fh
    figure = np.zeros((height, width), dtype=bool)

    def rect(y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
        return (yn >= y0) & (yn < y1) & (xn >= min(x0, x1)) & (xn < max(x0, x1))

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        img[mask] = colour
        figure[mask] = True

    skin = _rgb(SKIN_TONES[ident.skin])
    hair = _rgb(HAIR_COLOURS[ident.hair_colour])
    upper = _rgb(COLOURS[ident.upper_colour])
    lower = _rgb(COLOURS[ident.lower_colour])
    shoes = _rgb(COLOURS[ident.shoes_colour])
    tw = 0.11 if ident.gender == "male" else 0.095  # half torso width
    if ident.hair_length == "long":
        paint(rect(0.05, 0.27, -0.068, 0.068), hair)
    if ident.bag == "backpack":  # behind the body, sticking out on one side
        paint(rect(0.18, 0.46, side * (tw - 0.03), side * (tw + 0.10)), _rgb(COLOURS[ident.bag_colour]))
    legs = ((-0.125, -0.03), (0.03, 0.125)) if walking else ((-0.095, -0.01), (0.01, 0.095))
    cover = {"trousers": 0.92, "shorts": 0.68, "skirt": 0.52}[ident.lower_type]
    for x0, x1 in legs:
        paint(rect(0.52, cover, x0, x1), lower)
        paint(rect(cover, 0.92, x0, x1), skin)
        paint(rect(0.92, 0.98, x0 - 0.012, x1 + 0.012), shoes)
    if ident.lower_type == "skirt":
        half = 0.10 + 0.06 * (yn - 0.52) / 0.22  # a trapezoid widening downwards
        paint((yn >= 0.52) & (yn < 0.74) & (np.abs(xn) <= half), lower)
    else:
        paint(rect(0.52, 0.60, -0.10, 0.10), lower)  # hips
    paint(rect(0.16, 0.53, -tw, tw), upper)
    if ident.upper_type == "jacket":  # open front: a darker strip
        paint(rect(0.17, 0.53, -0.012, 0.012), upper * 0.55)
    sleeve_end = 0.28 if ident.upper_type == "tshirt" else 0.50
    for s in (-1, 1):
        paint(rect(0.17, sleeve_end, s * tw, s * (tw + 0.045)), upper)
        paint(rect(sleeve_end, 0.50, s * tw, s * (tw + 0.045)), skin)
        paint(rect(0.50, 0.54, s * tw, s * (tw + 0.045)), skin)
    paint(((yn - 0.09) / 0.07) ** 2 + (xn / 0.055) ** 2 <= 1.0, skin)  # head
    paint((((yn - 0.065) / 0.05) ** 2 + (xn / 0.06) ** 2 <= 1.0) & (yn < 0.075), hair)
    if ident.hat:
        colour = _rgb(COLOURS[ident.hat_colour])
        paint(rect(0.035, 0.055, -0.08, 0.08), colour)
        paint(rect(-0.015, 0.04, -0.055, 0.055), colour)
    if ident.bag == "handbag":
        paint(rect(0.47, 0.60, side * (tw + 0.01), side * (tw + 0.10)), _rgb(COLOURS[ident.bag_colour]))

    if style.outline:
        grown = figure.copy()
        grown[1:] |= figure[:-1]
        grown[:-1] |= figure[1:]
        grown[:, 1:] |= figure[:, :-1]
        grown[:, :-1] |= figure[:, 1:]
        edge = grown & ~figure
        img[edge] *= 0.3
    img *= rng.uniform(0.82, 1.18)  # brightness (camera exposure)
    img *= np.asarray(style.tint, dtype=np.float32)
    img = (img - 0.5) * style.contrast + 0.5
    for _ in range(style.blur):
        img = _blur(img)
    img += rng.normal(0.0, style.noise, img.shape).astype(np.float32)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- captions
# Words per style; a tuple lists synonyms drawn at random. Missing colour entries: the colour's own name.
_COLOUR_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "cuhk-pedes": {},
    "icfg-pedes": {"gray": ("grey",), "purple": ("violet", "purple"), "white": ("white", "pure white")},
    "rstpreid": {"gray": ("grey", "ash"), "red": ("red", "crimson"), "brown": ("brown", "coffee"),
                 "blue": ("blue", "navy"), "blond": ("golden", "blond")},
}
_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "cuhk-pedes": {
        "male": ("man", "guy"), "female": ("woman", "lady"),
        "tshirt": ("t-shirt", "short sleeved shirt"), "shirt": ("long sleeved shirt", "shirt"),
        "jacket": ("jacket", "zip up jacket"),
        "trousers": ("pants", "trousers"), "shorts": ("shorts",), "skirt": ("skirt",),
        "shoes": ("shoes",), "backpack": ("backpack",), "handbag": ("purse", "handbag"), "hat": ("hat",),
    },
    "icfg-pedes": {
        "male": ("man", "male"), "female": ("woman", "female"),
        "tshirt": ("short-sleeved T-shirt", "short-sleeved top"), "shirt": ("long-sleeved shirt",),
        "jacket": ("coat", "jacket with a zip"),
        "trousers": ("long trousers", "trousers"), "shorts": ("short trousers",), "skirt": ("skirt",),
        "shoes": ("sneakers", "shoes"), "backpack": ("backpack",), "handbag": ("handbag", "shoulder bag"),
        "hat": ("cap", "hat"),
    },
    "rstpreid": {
        "male": ("gentleman", "boy"), "female": ("lady", "girl"),
        "tshirt": ("tee", "short-sleeve top"), "shirt": ("sweater", "long-sleeve top"), "jacket": ("coat", "parka"),
        "trousers": ("slacks", "jeans"), "shorts": ("short pants",), "skirt": ("dress", "skirt"),
        "shoes": ("footwear", "boots"), "backpack": ("rucksack",), "handbag": ("tote", "hand bag"),
        "hat": ("beanie", "cap"),
    },
}


class _Say:
    """Word choice for one caption: ``say("tshirt")``, ``say.colour("gray")``."""

    def __init__(self, style: str, rng: np.random.Generator) -> None:
        self.style = style
        self.rng = rng

    def __call__(self, key: str) -> str:
        return _pick(self.rng, _WORDS[self.style][key])

    def colour(self, name: str) -> str:
        return _pick(self.rng, _COLOUR_WORDS[self.style].get(name, (name,)))


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article ("an orange bag", "a red bag")."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _pronouns(ident: Identity) -> tuple[str, str]:
    return ("he", "his") if ident.gender == "male" else ("she", "her")


def _captions_cuhk(ident: Identity, walking: bool, rng: np.random.Generator) -> list[str]:
    say = _Say("cuhk-pedes", rng)
    he, his = _pronouns(ident)
    bag = (f"{he.capitalize()} is carrying {_a(say.colour(ident.bag_colour))} {say(ident.bag)}."
           if ident.bag != "none" else f"{he.capitalize()} is not carrying anything.")
    hat = f" {he.capitalize()} is wearing {_a(say.colour(ident.hat_colour))} hat." if ident.hat else " No hat."
    first = (f"A {say(ident.gender)} with {ident.hair_length} {say.colour(ident.hair_colour)} hair is wearing "
             f"{_a(say.colour(ident.upper_colour))} {say(ident.upper_type)}, {say.colour(ident.lower_colour)} "
             f"{say(ident.lower_type)} and {say.colour(ident.shoes_colour)} shoes. {bag}{hat}")
    say = _Say("cuhk-pedes", rng)  # the second annotator draws their own words
    extras = []
    if ident.hat:
        extras.append(f"{_a(say.colour(ident.hat_colour))} {say('hat')}")
    if ident.bag != "none":
        extras.append(f"{_a(say.colour(ident.bag_colour))} {say(ident.bag)}")
    tail = (" and has " + " and ".join(extras)) if extras else " and carries no bag"
    second = (f"The {say(ident.gender)} has {ident.hair_length} {say.colour(ident.hair_colour)} hair and is "
              f"{'walking' if walking else 'standing'}. {his.capitalize()} {say(ident.upper_type)} is "
              f"{say.colour(ident.upper_colour)} and {his} {say(ident.lower_type)} "
              f"{'is' if ident.lower_type == 'skirt' else 'are'} {say.colour(ident.lower_colour)}. "
              f"{he.capitalize()} wears {say.colour(ident.shoes_colour)} {say('shoes')}{tail}.")
    return [first, second]


def _captions_icfg(ident: Identity, walking: bool, rng: np.random.Generator) -> list[str]:
    say = _Say("icfg-pedes", rng)
    he, his = _pronouns(ident)
    lower = (f"{_a(say.colour(ident.lower_colour))} skirt" if ident.lower_type == "skirt"
             else f"a pair of {say.colour(ident.lower_colour)} {say(ident.lower_type)}")
    hat = (f", with {_a(say.colour(ident.hat_colour))} {say('hat')} on {his} head" if ident.hat
           else " and nothing on the head")
    bag = (f"{he.capitalize()} is carrying {_a(say.colour(ident.bag_colour))} {say(ident.bag)} "
           f"{'on the back' if ident.bag == 'backpack' else 'in one hand'}."
           if ident.bag != "none" else f"{he.capitalize()} does not carry any bag.")
    return [f"The {say(ident.gender)} is wearing a pair of {say.colour(ident.shoes_colour)} {say('shoes')}, {lower} "
            f"and {_a(say.colour(ident.upper_colour))} {say(ident.upper_type)}. {he.capitalize()} has "
            f"{ident.hair_length} {say.colour(ident.hair_colour)} hair{hat}. {bag} {he.capitalize()} "
            f"{'is walking forward' if walking else 'is standing still'}."]


def _captions_rstp(ident: Identity, walking: bool, rng: np.random.Generator) -> list[str]:
    out = []
    for variant in range(2):
        say = _Say("rstpreid", rng)
        person = say(ident.gender)
        hair = f"{ident.hair_length} {say.colour(ident.hair_colour)} hair"
        bag = f"{say.colour(ident.bag_colour)} {say(ident.bag)}" if ident.bag != "none" else "no bag"
        hat = f"{say.colour(ident.hat_colour)} {say('hat')}" if ident.hat else "bareheaded"
        clothes = (f"{say.colour(ident.upper_colour)} {say(ident.upper_type)}, {say.colour(ident.lower_colour)} "
                   f"{say(ident.lower_type)}, {say.colour(ident.shoes_colour)} {say('shoes')}")
        if variant == 0:
            out.append(f"{person.capitalize()} in {clothes}; {hat}, {bag}, {hair}.")
        else:
            out.append(f"{clothes.capitalize()}. {person.capitalize()}, {hair}, {bag}, {hat}"
                       f"{', walking' if walking else ''}.")
    return out


def _union(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(word for group in groups for word in group))


# The generic corpus knows every word of every dataset (as a model pre-trained on web text does).
_WORDS[GENERIC_STYLE] = {key: _union(*(_WORDS[s][key] for s in STYLES)) for key in _WORDS["cuhk-pedes"]}
_COLOUR_WORDS[GENERIC_STYLE] = {name: _union(*(_COLOUR_WORDS[s].get(name, (name,)) for s in STYLES))
                                for name in (*COLOURS, *HAIR_COLOURS)}


def _captions_generic(ident: Identity, walking: bool, rng: np.random.Generator) -> list[str]:
    """Two alt-text-like captions: an opening phrase, then the attributes as fragments in random order."""
    out = []
    for _ in range(2):
        say = _Say(GENERIC_STYLE, rng)
        person = say(ident.gender)
        parts = [f"{say.colour(ident.upper_colour)} {say(ident.upper_type)}",
                 f"{say.colour(ident.lower_colour)} {say(ident.lower_type)}",
                 f"{say.colour(ident.shoes_colour)} {say('shoes')}",
                 f"{ident.hair_length} {say.colour(ident.hair_colour)} hair"]
        if ident.bag != "none":
            parts.append(f"{_a(say.colour(ident.bag_colour))} {say(ident.bag)}")
        if ident.hat:
            parts.append(f"{_a(say.colour(ident.hat_colour))} {say('hat')}")
        order = rng.permutation(len(parts))
        body = ", ".join(parts[i] for i in order)
        opening = _pick(rng, (f"a photo of {_a(person)} with", f"{_a(person)} with", f"picture: {person},",
                              f"street photo of {_a(person)}:"))
        out.append(f"{opening} {body}.")
    return out


_CAPTIONERS: dict[str, Callable[[Identity, bool, np.random.Generator], list[str]]] = {
    "cuhk-pedes": _captions_cuhk, "icfg-pedes": _captions_icfg, "rstpreid": _captions_rstp,
    GENERIC_STYLE: _captions_generic,
}


# ---------------------------------------------------------------------------------------------- captions, v3
PROTOCOLS: tuple[str, ...] = ("v2", "v3")
"""Generator protocols: ``v2`` captions name every attribute with words every style shares with the generic
corpus; ``v3`` captions name a random subset of attributes, and each style has its own words for some
concepts that the generic corpus never uses (module docstring)."""

V3_BASE_WORDS: dict[str, tuple[str, ...]] = {
    "male": ("man", "guy", "male"), "female": ("woman", "lady", "female"), "person": ("person", "pedestrian"),
    "tshirt": ("t-shirt", "short sleeved shirt"), "shirt": ("shirt", "long sleeved shirt"), "jacket": ("jacket",),
    "top": ("top",), "trousers": ("pants", "trousers"), "shorts": ("shorts",), "skirt": ("skirt",),
    "shoes": ("shoes",), "backpack": ("backpack",), "handbag": ("handbag", "purse"), "hat": ("hat", "cap"),
    **{name: (name,) for name in (*COLOURS, *HAIR_COLOURS)}, "gray": ("gray", "grey"),
}
"""The base lexicon: every word of the v3 generic corpus for a concept (a key of :data:`V3_BASE_WORDS` is a
gender, garment, bag, colour or ``"person"``/``"top"`` for an unnamed gender / upper-garment type)."""

V3_SPECIFIC_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "cuhk-pedes": {"red": ("crimson",), "blue": ("navy",), "green": ("olive",), "jacket": ("cardigan",),
                   "backpack": ("knapsack",)},
    "icfg-pedes": {"red": ("maroon",), "blue": ("cobalt",), "green": ("emerald",), "jacket": ("anorak",),
                   "backpack": ("schoolbag",)},
    "rstpreid": {"red": ("scarlet",), "blue": ("indigo",), "green": ("jade",), "jacket": ("parka",),
                 "backpack": ("rucksack",)},
}
"""Each style's own words for the same five concepts: they replace the base words in that style's captions
and appear in no other style and never in the generic corpus, so neither generic pre-training nor the source
teaches a target's words for them."""

_V3_STYLE_BASE: dict[str, dict[str, tuple[str, ...]]] = {  # each style's choice among the base synonyms
    "cuhk-pedes": {"male": ("man", "guy"), "female": ("woman", "lady"), "gray": ("gray",)},
    "icfg-pedes": {"male": ("male", "man"), "female": ("female", "woman"), "gray": ("grey",),
                   "tshirt": ("short sleeved shirt",), "trousers": ("trousers",)},
    "rstpreid": {"male": ("guy", "man"), "female": ("lady", "woman"), "tshirt": ("t-shirt",), "trousers": ("pants",)},
}
# (number of units a caption names: choices, weights); the gender counts as one unit.
_V3_UNITS_PER_CAPTION: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {
    "cuhk-pedes": ((2, 3, 4), (0.4, 0.4, 0.2)), "icfg-pedes": ((2, 3, 4), (0.2, 0.5, 0.3)),
    "rstpreid": ((2, 3), (0.6, 0.4)),
}
_V3_UNITS: tuple[str, ...] = ("gender", "hair", "upper", "lower", "shoes", "bag", "hat")
_V3_UNIT_WEIGHTS: tuple[float, ...] = (1.5, 1.0, 1.5, 1.2, 1.0, 1.0, 1.0)
_V3_BOTTOM_UP: tuple[str, ...] = ("shoes", "lower", "upper", "hat", "bag", "hair")  # ICFG's order

Mentions = dict[str, object]
"""What one v3 caption says: :class:`Identity` field name → value; an identity fits the caption when every
named field has that value."""


def v3_words(style: str) -> dict[str, tuple[str, ...]]:
    """The v3 lexicon of ``style`` (a dataset style or ``"generic"``): concept → words drawn at random."""
    if style == GENERIC_STYLE:
        return dict(V3_BASE_WORDS)
    style = _check_style(style)
    return {**V3_BASE_WORDS, **_V3_STYLE_BASE[style], **V3_SPECIFIC_WORDS[style]}


def _v3_phrases(ident: Identity, units: Sequence[str], words: dict[str, tuple[str, ...]], rng: np.random.Generator,
                article: bool = True) -> tuple[list[tuple[str, str]], Mentions]:
    """``(kind, phrase)`` per named unit (kind ``"wear"`` or ``"have"``) and what they say. Upper garments and
    hair are sometimes named only in part (``"a red top"``, ``"long hair"``)."""
    def say(key: str) -> str:
        return _pick(rng, words[key])

    def art(phrase: str) -> str:
        return _a(phrase) if article else phrase

    phrases: list[tuple[str, str]] = []
    said: Mentions = {}
    for unit in units:
        if unit == "gender":
            said["gender"] = ident.gender
        elif unit == "hair":
            part = _pick(rng, ("both", "colour", "length"), (0.6, 0.2, 0.2))
            colour = "" if part == "length" else say(ident.hair_colour) + " "
            length = "" if part == "colour" else ident.hair_length + " "
            phrases.append(("have", f"{length}{colour}hair"))
            if part != "colour":
                said["hair_length"] = ident.hair_length
            if part != "length":
                said["hair_colour"] = ident.hair_colour
        elif unit == "upper":
            typed = rng.random() < 0.5
            phrases.append(("wear", art(f"{say(ident.upper_colour)} {say(ident.upper_type if typed else 'top')}")))
            said["upper_colour"] = ident.upper_colour
            if typed:
                said["upper_type"] = ident.upper_type
        elif unit == "lower":
            phrase = f"{say(ident.lower_colour)} {say(ident.lower_type)}"
            phrases.append(("wear", art(phrase) if ident.lower_type == "skirt" else phrase))
            said.update(lower_type=ident.lower_type, lower_colour=ident.lower_colour)
        elif unit == "shoes":
            phrases.append(("wear", f"{say(ident.shoes_colour)} {say('shoes')}"))
            said["shoes_colour"] = ident.shoes_colour
        elif unit == "bag":
            phrases.append(("have", art(f"{say(ident.bag_colour)} {say(ident.bag)}") if ident.bag != "none"
                            else "no bag"))
            said["bag"] = ident.bag
            if ident.bag != "none":
                said["bag_colour"] = ident.bag_colour
        else:  # hat
            phrases.append(("wear", art(f"{say(ident.hat_colour)} {say('hat')}") if ident.hat else "no hat"))
            said["hat"] = ident.hat
            if ident.hat:
                said["hat_colour"] = ident.hat_colour
    return phrases, said


def _join(parts: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _v3_caption(style: str, ident: Identity, rng: np.random.Generator) -> tuple[str, Mentions]:
    """One v3 caption of ``ident`` in ``style`` (a dataset style) and what it says."""
    words = v3_words(style)
    counts, weights = _V3_UNITS_PER_CAPTION[style]
    k = int(counts[int(rng.choice(len(counts), p=np.asarray(weights) / sum(weights)))])
    w = np.asarray(_V3_UNIT_WEIGHTS)
    units = [_V3_UNITS[i] for i in rng.choice(len(_V3_UNITS), size=k, replace=False, p=w / w.sum())]
    if style == "icfg-pedes":
        units.sort(key=lambda u: _V3_BOTTOM_UP.index(u) if u in _V3_BOTTOM_UP else -1)
    gendered = "gender" in units
    subject = _pick(rng, words[ident.gender] if gendered else words["person"])
    pronoun = _pronouns(ident)[0] if gendered else "the " + subject
    phrases, said = _v3_phrases(ident, units, words, rng, article=style != "rstpreid")
    wear = [p for kind, p in phrases if kind == "wear"]
    have = [p for kind, p in phrases if kind == "have"]
    if style == "cuhk-pedes":
        template = int(rng.integers(4))
        if not wear or not have:  # k >= 2 units: at least one besides the gender
            text = f"{_a(subject).capitalize()} {'wearing' if wear else 'with'} {_join(wear or have)}."
        elif template == 0:
            text = f"{_a(subject).capitalize()} wearing {_join(wear)} with {_join(have)}."
        elif template == 1:
            text = f"The {subject} is wearing {_join(wear)}. {pronoun.capitalize()} has {_join(have)}."
        elif template == 2:
            text = f"{_a(subject).capitalize()} with {_join(have)} is dressed in {_join(wear)}."
        else:
            text = f"This {subject} wears {_join(wear)} and has {_join(have)}."
    elif style == "icfg-pedes":
        opening = _pick(rng, ("The {s} is wearing", "This {s} is dressed in", "In this image the {s} wears"))
        text = f"{opening.format(s=subject)} {_join(wear)}." if wear else f"The {subject} has {_join(have)}."
        if wear and have:
            text += f" {pronoun.capitalize()} {_pick(rng, ('has', 'also has', 'is seen with'))} {_join(have)}."
    else:  # rstpreid: terse fragments in random order
        fragments = [p for _, p in phrases]
        fragments = [fragments[i] for i in rng.permutation(len(fragments))]
        template = int(rng.integers(3))
        if template == 0 or not fragments:
            text = ", ".join([subject.capitalize(), *fragments]) + "."
        elif template == 1:
            text = "; ".join([fragments[0].capitalize(), *fragments[1:], subject]) + "."
        else:
            text = f"{subject.capitalize()} in {', '.join(fragments)}."
    return text, said


def v3_image_captions(style: str, ident: Identity, seed: int, pid: int, k: int) -> list[tuple[str, Mentions]]:
    """The v3 captions of image ``k`` of identity ``pid`` (as :func:`generate_person_dataset` writes them with
    ``protocol="v3"``) with what each says. They come from their own seeded stream, independent of the
    image's rendering, so they can be re-made without rendering."""
    style = _check_style(style)
    rng = np.random.default_rng([int(seed), _style_index(style), 3, int(pid), int(k)])
    return [_v3_caption(style, ident, rng) for _ in range(_STYLES[style].captions_per_image)]


def _v3_generic_captions(ident: Identity, rng: np.random.Generator) -> list[str]:
    """Two alt-text-like v3 generic captions: every attribute (the gender in 80 %), base lexicon only, in
    random order."""
    out = []
    for _ in range(2):
        units = ["hair", "upper", "lower", "shoes"]
        if ident.bag != "none" or rng.random() < 0.5:
            units.append("bag")
        if ident.hat or rng.random() < 0.5:
            units.append("hat")
        phrases, _ = _v3_phrases(ident, units, V3_BASE_WORDS, rng)
        body = ", ".join(phrases[i][1] for i in rng.permutation(len(phrases)))
        person = _pick(rng, V3_BASE_WORDS[ident.gender] if rng.random() < 0.8 else V3_BASE_WORDS["person"])
        opening = _pick(rng, (f"a photo of {_a(person)} with", f"{_a(person)} with", f"picture: {person},",
                              f"street photo of {_a(person)}:"))
        out.append(f"{opening} {body}.")
    return out


def _v3_identity_fits(style: str, n_train_ids: int, n_val_ids: int, n_test_ids: int, images_per_id: int, seed: int,
                      split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(fits (C, P), caption_ids (C,), first)``: whether each v3 caption of ``split`` fits each of the split's
    ``P`` identities (``first``, ``first + 1``, ...), from the captions' :data:`Mentions`, without rendering."""
    n_train, n_val, n_test = (_check_count(name, v, 0) for name, v in (("n_train_ids", n_train_ids),
                                                                       ("n_val_ids", n_val_ids),
                                                                       ("n_test_ids", n_test_ids)))
    images_per_id = _check_count("images_per_id", images_per_id, 1)
    style = _check_style(style)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be 'train', 'val' or 'test', got {split!r}")
    identities = sample_identities(n_train + n_val + n_test, style, seed)
    first, count = {"train": (0, n_train), "val": (n_train, n_val), "test": (n_train + n_val, n_test)}[split]
    if count == 0:
        raise ConfigError(f"split {split!r} has no identities")
    members = identities[first:first + count]
    fits, caption_ids = [], []
    for pid in range(first, first + count):
        for k in range(images_per_id):
            for _, said in v3_image_captions(style, identities[pid], seed, pid, k):
                fits.append([all(getattr(p, f) == v for f, v in said.items()) for p in members])
                caption_ids.append(pid)
    return np.asarray(fits, dtype=bool).reshape(len(caption_ids), count), np.asarray(caption_ids), first


def caption_uniqueness(style: str, n_train_ids: int = 40, n_test_ids: int = 10, images_per_id: int = 4,
                       seed: int = 0, *, n_val_ids: int = 0, split: str = "test") -> dict[str, float]:
    """How far the v3 captions of ``split`` of the dataset :func:`generate_person_dataset` writes with these
    arguments (and ``protocol="v3"``) identify a person, computed from the captions' :data:`Mentions`
    without rendering: ``unique`` = fraction of captions that fit exactly one identity of the split,
    ``mean_fitting`` = mean number of the split's identities a caption fits (its own included)."""
    fits, _, _ = _v3_identity_fits(style, n_train_ids, n_val_ids, n_test_ids, images_per_id, seed, split)
    per_caption = fits.sum(axis=1)
    return {"captions": float(per_caption.size), "unique": float(np.mean(per_caption == 1)),
            "mean_fitting": float(np.mean(per_caption))}


def mutual_pair_precision(fits: np.ndarray, caption_ids: np.ndarray, image_ids: np.ndarray, *, draws: int = 20,
                          seed: int = 0) -> dict[str, float]:
    """How right the mutual-nearest caption–image pairs of an oracle that scores by ``fits`` alone are.

    ``fits (C, I)``: whether caption ``c`` fits image ``i`` (bool); ``caption_ids (C,)``, ``image_ids (I,)``:
    their identities. The oracle scores a pair 1 when it fits, else 0, and breaks ties at random; a
    caption and an image are a mutual pair when each is the other's best. Returns the mean over ``draws``
    tie-breaks of the pairs' identity precision (``precision``) and of their number (``pairs``).

    This is the ceiling of pseudo-pairs mined as mutual nearest neighbours (GCKD's cross-domain ITM) when a
    caption cannot tell apart the identities it fits: no model that sees only what the captions say can
    do better."""
    fits = np.asarray(fits, dtype=bool)
    caption_ids, image_ids = np.asarray(caption_ids), np.asarray(image_ids)
    if fits.ndim != 2 or fits.shape != (caption_ids.size, image_ids.size) or fits.size == 0:
        raise ConfigError(f"fits must be (captions, images) = ({caption_ids.size}, {image_ids.size}) and not "
                          f"empty, got {fits.shape}")
    draws = _check_count("draws", draws, 1)
    rng = np.random.default_rng(seed)
    rows = np.arange(fits.shape[0])
    precision, pairs = [], []
    for _ in range(draws):
        score = fits + 1e-3 * rng.random(fits.shape)  # ties at random; a fit always beats a misfit
        best_image = score.argmax(axis=1)
        best_caption = score.argmax(axis=0)
        mutual = rows[best_caption[best_image] == rows]
        pairs.append(mutual.size)
        precision.append(float(np.mean(caption_ids[mutual] == image_ids[best_image[mutual]])) if mutual.size else 0.0)
    return {"precision": float(np.mean(precision)), "pairs": float(np.mean(pairs))}


def v3_split_fits(style: str, n_train_ids: int = 40, n_test_ids: int = 10, images_per_id: int = 4, seed: int = 0,
                  *, split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fits (C, I), caption_ids (C,), image_ids (I,))`` of ``split`` of the v3 dataset
    :func:`generate_person_dataset` writes with these arguments: whether each caption's attributes are
    those of each image's identity (from the captions' :data:`Mentions`, without rendering)."""
    fits, caption_ids, first = _v3_identity_fits(style, n_train_ids, 0, n_test_ids, images_per_id, seed, split)
    image_ids = np.repeat(np.arange(first, first + fits.shape[1]), images_per_id)
    return fits[:, image_ids - first], caption_ids, image_ids


# ---------------------------------------------------------------------------------------------- writing
def _image_name(style: str, split: str, pid: int, k: int, camera: int, ext: str) -> str:
    if style == "cuhk-pedes":
        return f"cam_{'ab'[camera % 2]}/{pid + 1:05d}_{k:02d}{ext}"
    if style == "icfg-pedes":
        return f"{split}/{pid:04d}/{pid:04d}_c{camera:02d}_{k:04d}{ext}"
    return f"{pid:04d}_c{camera:02d}_{k:04d}{ext}"


def _entry(style: str, split: str, pid: int, rel: str, captions: list[str]) -> dict[str, object]:
    # Key order and id base as in the real annotation files (the layout IRRA and RaSa read).
    if style == "rstpreid":
        return {"id": pid, "img_path": rel, "captions": captions, "split": split}
    tokens = [clean_caption(c, None).split() for c in captions]
    return {"split": split, "captions": captions, "file_path": rel, "processed_tokens": tokens,
            "id": pid + 1 if style == "cuhk-pedes" else pid}


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def generate_person_dataset(style: str, out_dir: str | os.PathLike, n_train_ids: int = 40, n_test_ids: int = 10,
                            images_per_id: int = 4, seed: int = 0, image_size: tuple[int, int] = (48, 24), *,
                            n_val_ids: int = 0, overwrite: bool = False, protocol: str = "v2") -> Path:
    """Write a synthetic dataset of ``style`` (``"cuhk-pedes"``, ``"icfg-pedes"``, ``"rstpreid"``) into
    ``out_dir``: the style's annotation json plus ``imgs/``; return ``out_dir``.

    Identities ``0..n_train_ids-1`` are train, then ``n_val_ids`` val (not for ICFG-PEDES, which has no
    val split), then ``n_test_ids`` test; each has ``images_per_id`` images. ``image_size`` = (H, W) is
    the base size; the width is scaled by the style's aspect factor. Files are written into a temporary
    sibling folder that is renamed into place, so ``out_dir`` is never left half-written; an existing
    non-empty ``out_dir`` is replaced only with ``overwrite=True``. ``protocol``: ``"v2"`` (every attribute
    named) or ``"v3"`` (a random subset, the style's own words; module docstring); the images are the same.
    """
    style = _check_style(style)
    protocol = _check_protocol(protocol)
    n_train = _check_count("n_train_ids", n_train_ids, 0)
    n_val = _check_count("n_val_ids", n_val_ids, 0)
    n_test = _check_count("n_test_ids", n_test_ids, 0)
    per_id = _check_count("images_per_id", images_per_id, 1)
    seed = _check_count("seed", seed, 0)
    if n_train + n_val + n_test == 0:
        raise ConfigError("the dataset would be empty: give n_train_ids, n_val_ids or n_test_ids > 0")
    if style == "icfg-pedes" and n_val:
        raise ConfigError("ICFG-PEDES has no val split (its json allows train and test only); set n_val_ids=0")
    _check_image_size(image_size)
    spec = _STYLES[style]
    height = int(image_size[0])
    width = max(8, round(int(image_size[1]) * spec.width_factor))
    identities = sample_identities(n_train + n_val + n_test, style, seed)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return _write_dataset(style, style, Path(out_dir), identities, splits, per_id, seed, (height, width),
                          lambda rng: spec, overwrite, protocol)


def generate_pretraining_corpus(out_dir: str | os.PathLike, n_ids: int = 1000, images_per_id: int = 2,
                                seed: int = 0, image_size: tuple[int, int] = (48, 24), *, n_test_ids: int = 0,
                                overwrite: bool = False, protocol: str = "v2") -> Path:
    """Write the generic pre-training corpus (module docstring) into ``out_dir`` in the CUHK-PEDES format:
    ``n_ids`` train identities (then ``n_test_ids`` test identities, to monitor the pre-training), each
    with ``images_per_id`` images in random rendering styles and two generic captions (``protocol="v3"``:
    with the base lexicon :data:`V3_BASE_WORDS` only). Deterministic for the arguments; written atomically
    like :func:`generate_person_dataset`."""
    protocol = _check_protocol(protocol)
    n_train = _check_count("n_ids", n_ids, 1)
    n_test = _check_count("n_test_ids", n_test_ids, 0)
    per_id = _check_count("images_per_id", images_per_id, 1)
    seed = _check_count("seed", seed, 0)
    _check_image_size(image_size)
    identities = sample_identities(n_train + n_test, GENERIC_STYLE, seed)
    splits = ["train"] * n_train + ["test"] * n_test
    return _write_dataset(GENERIC_STYLE, "cuhk-pedes", Path(out_dir), identities, splits, per_id, seed,
                          (int(image_size[0]), int(image_size[1])), _random_style, overwrite, protocol)


def _check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown synthetic protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return protocol


MAX_IMAGE_SIDE = 2048
"""Largest synthetic image height or width: beyond person-retrieval sizes (384 x 128) by far."""


def _check_image_size(image_size: tuple[int, int]) -> None:
    if (len(image_size) != 2 or not 16 <= int(image_size[0]) <= MAX_IMAGE_SIDE
            or not 8 <= int(image_size[1]) <= MAX_IMAGE_SIDE):
        raise ConfigError(f"image_size (--image-size) must be (height, width) with 16 <= height <= {MAX_IMAGE_SIDE} "
                          f"and 8 <= width <= {MAX_IMAGE_SIDE}, got {tuple(image_size)!r}")


SYNTHETIC_MARKER = ".crossret-synthetic"


def _write_dataset(style: str, file_format: str, out: Path, identities: list[Identity], splits: list[str],
                   per_id: int, seed: int, size: tuple[int, int], spec_for: Callable[[np.random.Generator], _Style],
                   overwrite: bool, protocol: str = "v2") -> Path:
    """Render and write every image and annotation of one dataset (``style`` picks the captions and the
    seeded streams, ``file_format`` the json layout and file names, ``protocol`` the caption generator) into
    a temporary sibling folder that is renamed into place."""
    height, width = size
    style_index = _style_index(style)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace a "
                              "synthetic dataset crossret wrote, or choose another folder")
        if out.is_symlink() or not (out / SYNTHETIC_MARKER).is_file():
            raise ConfigError(f"{out} is not a synthetic dataset crossret wrote (no {SYNTHETIC_MARKER}); crossret "
                              "never replaces it, even with overwrite: choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = []
        for pid, (ident, split) in enumerate(zip(identities, splits, strict=True)):
            for k in range(per_id):
                # One generator per image: an image does not depend on how many others were drawn.
                rng = np.random.default_rng([seed, style_index, 2, pid, k])
                camera = int(rng.integers(1, 16))
                walking = bool(rng.random() < 0.5)
                side = 1 if rng.random() < 0.5 else -1
                spec = spec_for(rng)
                pixels = _render(ident, spec, rng, height, width, walking, side)
                ext = spec.extensions[camera % len(spec.extensions)]
                rel = _image_name(file_format, split, pid, k, camera, ext)
                path = tmp / "imgs" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                if ext == ".png":
                    Image.fromarray(pixels).save(path, format="PNG")
                else:
                    Image.fromarray(pixels).save(path, format="JPEG", quality=92, subsampling=0)
                if protocol == "v2":
                    captions = _CAPTIONERS[style](ident, walking, rng)[: spec.captions_per_image]
                elif style == GENERIC_STYLE:
                    captions = _v3_generic_captions(ident, rng)[: spec.captions_per_image]
                else:
                    captions = [text for text, _ in v3_image_captions(style, ident, seed, pid, k)]
                entries.append(_entry(file_format, split, pid, rel, captions))
        (tmp / ANNOTATION_FILES[file_format]).write_text(json.dumps(entries) + "\n", encoding="utf-8")
        # Only folders holding this marker are ever replaced (overwrite=True): a user's own data never is.
        marker: dict[str, object] = {"format": "crossret-synthetic-person", "style": style, "seed": seed}
        if protocol != "v2":  # v2 markers stay as they were
            marker["protocol"] = protocol
        (tmp / SYNTHETIC_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        mode = 0o777 & ~_umask()
        for folder, dirs, _ in os.walk(tmp):  # mkdtemp makes a private 0700 folder; give normal permissions
            for d in dirs:
                os.chmod(os.path.join(folder, d), mode)
        os.chmod(tmp, mode)
        if out.exists():
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "data")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
                return out
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def generate_person_datasets(out_root: str | os.PathLike, styles: Iterable[str] = STYLES, **kwargs: object
                             ) -> dict[str, Path]:
    """Generate several styles into ``out_root/<CUHK-PEDES|ICFG-PEDES|RSTPReid>``; kwargs as
    :func:`generate_person_dataset`, ``protocol`` included (``n_val_ids`` is ignored for ICFG-PEDES)."""
    paths = {}
    for style in styles:
        name = _check_style(style)
        args = dict(kwargs)
        if name == "icfg-pedes":
            args.pop("n_val_ids", None)
        paths[name] = generate_person_dataset(name, Path(out_root) / DATASET_DIRS[name], **args)  # type: ignore[arg-type]
    return paths


# ---------------------------------------------------------------------------------------------- captions corpus
def dataset_captions(root: str | os.PathLike, splits: Iterable[str] = ("train",), *, clean: bool = True,
                     max_words: int | None = None) -> list[str]:
    """All captions of ``splits`` of the dataset in ``root`` (any of the three formats, detected), in file
    order; cleaned with :func:`clean_caption` unless ``clean=False``."""
    splits = tuple(splits)
    for split in splits:
        if split not in SPLIT_NAMES:
            raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLIT_NAMES)}")
    dataset = load_person_dataset(None, root, check_images=False)
    return [clean_caption(c, max_words) if clean else c
            for record in dataset if record.split in splits for c in record.captions]


def write_wordpiece_corpus(roots: str | os.PathLike | Iterable[str | os.PathLike], path: str | os.PathLike,
                           splits: Iterable[str] = ("train",)) -> Path:
    """Write the cleaned captions of ``splits`` of every dataset in ``roots``, one per line, to ``path``
    (atomically) — the input of ``tokenizers``' WordPiece trainer. Returns ``path``."""
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    splits = tuple(splits)
    lines = [caption for root in roots for caption in dataset_captions(root, splits)]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return Path(path)
