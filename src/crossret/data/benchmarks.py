"""Named benchmarks and the protocol split (docs/benchmarks.md, "Protocols").

A benchmark is a source file, a target file, a query rule and a preprocessing rule. Everything
that decides the numbers is recorded in ``RetrievalSplit.protocol`` (seed, rule, file checksums,
library versions, sizes) so that a result names its exact inputs.

Families:

* ``digits-m2u`` / ``digits-u2m``: JDA's MNIST_vs_USPS.mat; PWCF protocol (500 random target
  queries, the rest of the target is the training set / single-domain database); raw pixels.
* ``office-caltech-surf-<s>2<t>``: SURF BoW; rows divided by their sum, then columns z-scored with
  statistics of the training data (source and target-train, never the queries); 10 % queries.
* ``office31-<s>2<t>`` / ``officehome-<s>2<t>``: COUPLE-format deep features supplied by the user;
  10 % queries; features used as given.
* ``demo``: scikit-learn's bundled ``load_digits`` with a synthetic style shift on the target;
  always available.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossret.data.domain import Domain, RetrievalSplit
from crossret.data.readers import Role, check_pair, read_domain, read_domain_pair, sha256_of_origins
from crossret.errors import ConfigError, DataError

DATA_ENV = "CROSSRET_DATA"
DEFAULT_SPLIT_SEED = 313
PWCF_QUERIES = 500
COUPLE_QUERY_FRACTION = 0.1
DEMO_DOMAIN_SEED = 0  # fixes which digits form each demo domain; independent of split_seed

_COUPLE_RULE = (
    "sklearn.model_selection.train_test_split(arange(n_target), test_size=query_fraction, "
    "random_state=split_seed), not stratified; the test part are the queries, the train part the "
    "target training set / single-domain database, both in the order train_test_split returns (as COUPLE)"
)
_COUNT_RULE = (
    "n_queries target samples drawn without replacement: numpy.random.default_rng(split_seed)"
    ".permutation(n_target)[:n_queries] are the queries, the rest the target training set / "
    "single-domain database; both kept in file order"
)


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class BenchmarkInfo:
    """What ``crossret benchmarks`` shows: files are resolved against the data dir when one is given."""

    name: str
    family: str
    files: tuple[Path, ...]
    present: bool
    description: str
    protocol: str


@dataclass(frozen=True)
class _Spec:
    name: str
    family: str
    description: str
    protocol: str
    # One entry per required file: its candidate relative paths, the first existing one wins.
    files: tuple[tuple[str, ...], ...]
    load: Callable[[_Spec, list[Path], int], RetrievalSplit]
    source: str = ""
    target: str = ""


# MNIST is the X_src half of the JDA file, USPS the X_tar half.
_JDA_ROLES: dict[str, Role] = {"mnist": "source", "usps": "target"}
_JDA_VARIABLES = {"mnist": "X_src/Y_src", "usps": "X_tar/Y_tar"}


def _digits_loader(spec: _Spec, paths: list[Path], split_seed: int) -> RetrievalSplit:
    source = read_domain(paths[0], role=_JDA_ROLES[spec.source], name=spec.source)
    target = read_domain(paths[0], role=_JDA_ROLES[spec.target], name=spec.target)
    return make_split(
        source,
        target,
        benchmark=spec.name,
        n_queries=PWCF_QUERIES,
        split_seed=split_seed,
        protocol_extra={
            "protocol": "pwcf",
            "family": spec.family,
            "preprocessing": "none (raw pixels in [0, 1], 16x16 = 256-d)",
            "source_variables": _JDA_VARIABLES[spec.source],
            "target_variables": _JDA_VARIABLES[spec.target],
        },
    )


def _row_normalise(domain: Domain) -> Domain:
    """Divide each row by its sum; all-zero rows stay zero (no division by zero)."""
    x = domain.features.astype(np.float64)
    sums = x.sum(axis=1, keepdims=True)
    x = np.divide(x, sums, out=np.zeros_like(x), where=sums != 0)
    return domain.with_features(x)


def zscore_with_training_stats(split: RetrievalSplit, description: str) -> RetrievalSplit:
    """Z-score every column with mean/std of source ∪ target-train; the queries never contribute.

    Columns with zero spread get std 1 (they are only centred).
    """
    train = np.vstack([split.source.features, split.target_train.features]).astype(np.float64)
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0

    def apply(domain: Domain) -> Domain:
        return domain.with_features((domain.features.astype(np.float64) - mean) / std)

    protocol = {**split.protocol, "preprocessing": description}
    return RetrievalSplit(
        apply(split.source), apply(split.target_train), apply(split.queries), split.benchmark, protocol
    )


def _surf_loader(spec: _Spec, paths: list[Path], split_seed: int) -> RetrievalSplit:
    source, target, bases = read_domain_pair(paths[0], paths[1], source_name=spec.source, target_name=spec.target)
    source, target = _row_normalise(source), _row_normalise(target)
    split = make_split(
        source,
        target,
        benchmark=spec.name,
        query_fraction=COUPLE_QUERY_FRACTION,
        split_seed=split_seed,
        protocol_extra={"protocol": "couple-10pct", "family": spec.family, **bases},
    )
    return zscore_with_training_stats(
        split,
        "each row divided by its sum (zero rows kept), then each column z-scored with the mean and "
        "population std (ddof=0) of source ∪ target-train (queries excluded); std 0 -> 1",
    )


def _deep_loader(spec: _Spec, paths: list[Path], split_seed: int) -> RetrievalSplit:
    source, target, bases = read_domain_pair(paths[0], paths[1], source_name=spec.source, target_name=spec.target)
    return make_split(
        source,
        target,
        benchmark=spec.name,
        query_fraction=COUPLE_QUERY_FRACTION,
        split_seed=split_seed,
        protocol_extra={
            "protocol": "couple-10pct",
            "family": spec.family,
            **bases,
            "preprocessing": "none (deep features used as given)",
        },
    )


def _demo_loader(spec: _Spec, paths: list[Path], split_seed: int) -> RetrievalSplit:
    import sklearn

    source, target = demo_domains()
    checksums = {
        f"{role}_array_sha256": hashlib.sha256(d.features.tobytes() + d.labels.tobytes()).hexdigest()
        for role, d in (("source", source), ("target", target))
    }
    return make_split(
        source,
        target,
        benchmark=spec.name,
        query_fraction=COUPLE_QUERY_FRACTION,
        split_seed=split_seed,
        protocol_extra={
            "protocol": "demo",
            "family": spec.family,
            "source_file": "sklearn.datasets.load_digits (half A, stratified, seed 0)",
            "target_file": "sklearn.datasets.load_digits (half B, stratified, seed 0) + style shift",
            **checksums,
            "preprocessing": "source: pixels/16; target: " + DEMO_STYLE_SHIFT,
            "sklearn_version": sklearn.__version__,
        },
    )


_PWCF_PROTOCOL = (
    f"{PWCF_QUERIES} random target queries (split_seed); the rest of the target = training set and "
    "single-domain database; whole source = cross-domain database; no preprocessing"
)
_COUPLE_PROTOCOL = (
    "10 % of the target are queries (train_test_split, test_size=0.1, random_state=split_seed); "
    "the rest = training set and single-domain database; whole source = cross-domain database"
)
_SURF = {"a": "amazon", "c": "caltech", "d": "dslr", "w": "webcam"}
_OFFICE31 = {"a": "Amazon", "d": "Dslr", "w": "Webcam"}
_OFFICEHOME = {"a": "Art", "c": "Clipart", "p": "Product", "r": "Real_World"}
_COUPLE_REPORTED_OFFICEHOME = ("a2r", "c2r", "p2r", "r2a", "r2c", "r2p")


def _build_registry() -> dict[str, _Spec]:
    specs: list[_Spec] = [
        _Spec(
            "demo",
            "demo",
            "scikit-learn load_digits (8x8, 64-d, 10 classes): half A as source, half B with a "
            "synthetic style shift as target; always available",
            "10 % of the target are queries (train_test_split, random_state=split_seed)",
            (),
            _demo_loader,
        )
    ]
    for src, tgt, text in (
        ("mnist", "usps", "MNIST (2,000) -> USPS (1,800)"),
        ("usps", "mnist", "USPS (1,800) -> MNIST (2,000)"),
    ):
        specs.append(
            _Spec(
                f"digits-{src[0]}2{tgt[0]}",
                "digits",
                f"{text}, 16x16 raw pixels (256-d), 10 classes (JDA/PWCF file)",
                _PWCF_PROTOCOL,
                (("mnist-usps-jda/MNIST_vs_USPS.mat",),),
                _digits_loader,
                src,
                tgt,
            )
        )
    for s, t in _pairs(_SURF):
        specs.append(
            _Spec(
                f"office-caltech-surf-{s}2{t}",
                "office-caltech-surf",
                f"Office-Caltech-10 SURF BoW (800-d), {_SURF[s]} -> {_SURF[t]}, 10 classes",
                _COUPLE_PROTOCOL + "; rows / row sum, then z-score with training-data statistics",
                tuple((f"office-caltech10-surf/{_SURF[d]}_SURF_L10.mat",) for d in (s, t)),
                _surf_loader,
                _SURF[s],
                _SURF[t],
            )
        )
    for family, folders, domains, classes in (
        ("office31", ("office31", "Office31_mat"), _OFFICE31, 31),
        ("officehome", ("officehome", "OfficeHome_mat"), _OFFICEHOME, 65),
    ):
        for s, t in _pairs(domains):
            task = f"{s}2{t}"
            flag = (
                "; one of the 6 tasks COUPLE reports"
                if family == "officehome" and task in _COUPLE_REPORTED_OFFICEHOME
                else ""
            )
            specs.append(
                _Spec(
                    f"{family}-{task}",
                    family,
                    f"{family} deep features (COUPLE .mat, user-supplied), {domains[s]} -> {domains[t]}, "
                    f"{classes} classes{flag}",
                    _COUPLE_PROTOCOL + "; features used as given",
                    tuple(tuple(f"{folder}/{domains[d]}_feature_mat.mat" for folder in folders) for d in (s, t)),
                    _deep_loader,
                    domains[s],
                    domains[t],
                )
            )
    return {spec.name: spec for spec in specs}


def _pairs(domains: dict[str, str]) -> list[tuple[str, str]]:
    return [(s, t) for s in domains for t in domains if s != t]


_REGISTRY = _build_registry()


# ------------------------------------------------------------------------------------ public API
def resolve_data_dir(explicit: str | os.PathLike | None) -> Path | None:
    """The data directory: ``explicit`` if given, else ``$CROSSRET_DATA``, else ``None``.

    A directory that is named but does not exist is a :class:`DataError`.
    """
    if explicit is not None and str(explicit) != "":
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise DataError(f"data directory {path} does not exist; pass --data-dir with an existing folder")
        return path
    env = os.environ.get(DATA_ENV, "")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(
                f"{DATA_ENV}={env} does not exist or is not a directory; point {DATA_ENV} at the data "
                "folder or unset it"
            )
        return path
    return None


def benchmark_names() -> list[str]:
    """All registered benchmark names, in listing order."""
    return list(_REGISTRY)


def list_benchmarks(data_dir: str | os.PathLike | None = None) -> list[BenchmarkInfo]:
    """Every named benchmark with its files (resolved against the data dir) and whether all exist.

    ``data_dir=None`` falls back to ``$CROSSRET_DATA``; with no data dir only ``demo`` is present.
    """
    root = resolve_data_dir(data_dir)
    infos = []
    for spec in _REGISTRY.values():
        files = _resolve_files(spec, root)
        # demo needs no files; every other benchmark needs a data dir holding all of its files.
        present = (root is not None and all(path.is_file() for path in files)) if spec.files else True
        infos.append(BenchmarkInfo(spec.name, spec.family, tuple(files), present, spec.description, spec.protocol))
    return infos


def load_benchmark(
    name: str, data_dir: str | os.PathLike | None = None, split_seed: int = DEFAULT_SPLIT_SEED
) -> RetrievalSplit:
    """Load a named benchmark and split it by its protocol (see the module doc)."""
    spec = _REGISTRY.get(name)
    if spec is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown benchmark {name!r}.{hint} Valid names: {', '.join(_REGISTRY)} "
            "(`crossret benchmarks` lists them with their data)"
        )
    if not spec.files:
        return spec.load(spec, [], split_seed)
    root = resolve_data_dir(data_dir)
    if root is None:
        needed = "; ".join(" or ".join(candidates) for candidates in spec.files)
        raise DataError(
            f"benchmark {name!r} needs data files ({needed}) but no data directory is set; pass "
            f"--data-dir DIR (data_dir=...) or set {DATA_ENV} to the folder that holds them"
        )
    paths = _resolve_files(spec, root)
    missing = [
        " or ".join(str(root / c) for c in candidates)
        for candidates, path in zip(spec.files, paths, strict=True)
        if not path.is_file()
    ]
    if missing:
        raise DataError(
            f"benchmark {name!r}: missing file(s): {'; '.join(missing)}; pass --data-dir DIR "
            f"(data_dir=...) or set {DATA_ENV} to the folder that holds them"
        )
    return spec.load(spec, paths, split_seed)


def make_split(
    source: Domain,
    target: Domain,
    *,
    benchmark: str = "custom",
    n_queries: int | None = None,
    query_fraction: float = COUPLE_QUERY_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    protocol_extra: dict[str, Any] | None = None,
) -> RetrievalSplit:
    """Split the target into queries and target-train; the whole source is the cross-domain database.

    With ``n_queries`` exactly that many random target samples are queries (seeded); otherwise
    ``train_test_split(test_size=query_fraction, random_state=split_seed)`` as COUPLE does. The pair
    is validated with :func:`check_pair`; ``protocol`` records everything needed to reproduce it
    (``protocol_extra`` entries are added last and win).
    """
    notes = check_pair(source, target)
    if (
        isinstance(split_seed, bool)
        or not isinstance(split_seed, (int, np.integer))
        or not (0 <= int(split_seed) < 2**32)
    ):
        raise ConfigError(f"split_seed must be an integer in [0, 2**32), got {split_seed!r}")
    split_seed = int(split_seed)
    n = target.n
    where = target.origin or target.name
    if n_queries is not None:
        if isinstance(n_queries, bool) or not isinstance(n_queries, (int, np.integer)):
            raise ConfigError(f"n_queries must be an integer, got {n_queries!r}")
        n_queries = int(n_queries)
        n_test = n_queries
    else:
        if not isinstance(query_fraction, (int, float)) or not 0 < float(query_fraction) < 1:
            raise ConfigError(f"query_fraction must be a number strictly between 0 and 1, got {query_fraction!r}")
        n_test = math.ceil(float(query_fraction) * n)  # sklearn rounds the test part up
    if n_test < 2 or n - n_test < 2:
        raise DataError(
            f"target {where}: cannot split {n} samples into {n_test} queries and {n - n_test} training "
            "samples; a split needs at least 2 of each (use a larger target, or change "
            + ("n_queries)" if n_queries is not None else "query_fraction)")
        )

    if n_queries is not None:
        order = np.random.default_rng(split_seed).permutation(n)
        query_idx, train_idx = np.sort(order[:n_queries]), np.sort(order[n_queries:])
        rule = _COUNT_RULE
    else:
        from sklearn.model_selection import train_test_split

        train_idx, query_idx = train_test_split(np.arange(n), test_size=float(query_fraction), random_state=split_seed)
        rule = _COUPLE_RULE

    import sklearn

    protocol: dict[str, Any] = {
        "protocol": "custom",
        "split_seed": split_seed,
        "n_queries": n_queries,
        "query_fraction": None if n_queries is not None else float(query_fraction),
        "query_rule": rule,
        "preprocessing": "none",
        "source_name": source.name,
        "target_name": target.name,
        **sha256_of_origins({"source": source, "target": target}),
        "sizes": {
            "source": source.n,
            "target": n,
            "target_train": len(train_idx),
            "queries": len(query_idx),
        },
        "numpy_version": np.__version__,
        "sklearn_version": sklearn.__version__,
        "notes": notes,
    }
    protocol.update(protocol_extra or {})
    return RetrievalSplit(
        source=source,
        target_train=target.subset(train_idx, name=f"{target.name}/train"),
        queries=target.subset(query_idx, name=f"{target.name}/queries"),
        benchmark=benchmark,
        protocol=protocol,
    )


# ------------------------------------------------------------------------------------ demo
DEMO_STYLE_SHIFT = (
    "image shifted right by 1 pixel (zero fill), mixed 50/50 with its 3x3 binomial blur "
    "([1,2,1]x[1,2,1]/16, zero padding), gamma 0.7, contrast x0.8, plus the fixed offset pattern "
    "0.15*(0.5+0.5*cos(pi*(row+col)/3.5)), clipped to [0, 1]"
)


def demo_domains() -> tuple[Domain, Domain]:
    """The two ``demo`` domains from scikit-learn's ``load_digits`` (1,797 8x8 images, 0..16).

    The images are split into two disjoint halves, stratified by class, with a fixed seed
    (``DEMO_DOMAIN_SEED`` = 0; the domains are the dataset, so they do not depend on split_seed);
    each half keeps the original order. Source = half A, pixels / 16 in [0, 1]. Target = half B,
    pixels / 16, then the deterministic style shift, applied per 8x8 image ``x``:

    1. ``x`` moved one pixel to the right (the leftmost column becomes 0, the rightmost is dropped);
    2. ``x = 0.5 * x + 0.5 * blur(x)``, blur = 3x3 kernel ``[1,2,1]^T [1,2,1] / 16``, zero padding;
    3. ``x = 0.8 * x ** 0.7`` (gamma 0.7 brightens strokes, contrast 0.8);
    4. ``x += 0.15 * (0.5 + 0.5 * cos(pi * (row + col) / 3.5))``, a fixed diagonal stripe pattern;
    5. clip to [0, 1].

    The target stays well clustered (1-NN within the target is as accurate as within the source)
    while raw nearest-source-neighbour classification of target images loses about 40 points,
    so there is a real but learnable gap.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    labels = digits.target.astype(np.int64)
    half_a, half_b = train_test_split(
        np.arange(labels.size), test_size=0.5, stratify=labels, random_state=DEMO_DOMAIN_SEED
    )
    half_a, half_b = np.sort(half_a), np.sort(half_b)
    shifted = _style_shift(images[half_b])
    source = Domain("digits-a", images[half_a].reshape(half_a.size, -1), labels[half_a], "sklearn:load_digits")
    target = Domain("digits-b-shifted", shifted.reshape(half_b.size, -1), labels[half_b], "sklearn:load_digits+shift")
    return source, target


def _style_shift(images: np.ndarray) -> np.ndarray:
    """The demo target transform (see :func:`demo_domains`); ``images`` is ``(n, h, w)`` in [0, 1]."""
    out = np.zeros_like(images)
    out[:, :, 1:] = images[:, :, :-1]
    kernel = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
    padded = np.pad(out, ((0, 0), (1, 1), (1, 1)))
    h, w = out.shape[1:]
    blurred = sum(kernel[i, j] * padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3))
    out = 0.5 * out + 0.5 * blurred
    out = 0.8 * out**0.7
    rows, cols = np.mgrid[0:h, 0:w]
    out = out + 0.15 * (0.5 + 0.5 * np.cos(np.pi * (rows + cols) / 3.5))
    return np.clip(out, 0.0, 1.0)


def _resolve_files(spec: _Spec, root: Path | None) -> list[Path]:
    """Per required file: the first existing candidate under ``root``, else the first candidate."""
    resolved = []
    for candidates in spec.files:
        if root is None:
            resolved.append(Path(candidates[0]))
            continue
        existing = [root / c for c in candidates if (root / c).is_file()]
        resolved.append(existing[0] if existing else root / candidates[0])
    return resolved
