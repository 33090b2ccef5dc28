"""Named benchmarks, the data-dir rules, the protocol split and the demo domains."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from sklearn.model_selection import train_test_split

from crossret.data import (
    Domain,
    demo_domains,
    list_benchmarks,
    load_benchmark,
    make_split,
    read_domain,
    resolve_data_dir,
)
from crossret.errors import ConfigError, DataError


def _expected_names() -> set[str]:
    names = {"demo", "digits-m2u", "digits-u2m"}
    names |= {f"office-caltech-surf-{s}2{t}" for s in "acdw" for t in "acdw" if s != t}
    names |= {f"office31-{s}2{t}" for s in "adw" for t in "adw" if s != t}
    names |= {f"officehome-{s}2{t}" for s in "acpr" for t in "acpr" if s != t}
    return names


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CROSSRET_DATA", raising=False)


def _indexed_domain(n: int, name: str, k: int = 3, origin: str = "") -> Domain:
    """Feature column 0 is the row index, so every split part can be traced back to its rows."""
    x = np.column_stack([np.arange(n), np.ones(n)]).astype(np.float64)
    return Domain(name, x, np.arange(n) % k, origin)


# ------------------------------------------------------------------------------------ registry
def test_names_complete_and_only_demo_present_in_an_empty_dir(tmp_path: Path) -> None:
    infos = list_benchmarks(tmp_path)
    names = [info.name for info in infos]
    assert len(names) == 2 + 12 + 6 + 12 + 1 == len(set(names))
    assert set(names) == _expected_names()
    assert [info.name for info in infos if info.present] == ["demo"]
    digits = next(info for info in infos if info.name == "digits-m2u")
    assert digits.files == (tmp_path / "mnist-usps-jda" / "MNIST_vs_USPS.mat",)
    assert digits.family == "digits" and "500" in digits.protocol


def test_list_without_data_dir_shows_relative_files(no_env: None) -> None:
    infos = {info.name: info for info in list_benchmarks(None)}
    assert [name for name, info in infos.items() if info.present] == ["demo"]
    assert infos["office-caltech-surf-a2w"].files == (
        Path("office-caltech10-surf/amazon_SURF_L10.mat"),
        Path("office-caltech10-surf/webcam_SURF_L10.mat"),
    )


def test_officehome_flags_the_tasks_couple_reports(tmp_path: Path) -> None:
    infos = {info.name: info for info in list_benchmarks(tmp_path)}
    flagged = {name for name, info in infos.items() if "COUPLE reports" in info.description}
    assert flagged == {f"officehome-{t}" for t in ("a2r", "c2r", "p2r", "r2a", "r2c", "r2p")}


def _write_couple(path: Path, n: int, d: int = 4, k: int = 3, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).normal(size=(n, d))
    scipy.io.savemat(path, {"deepfea": x, "label": (np.arange(n) % k).reshape(-1, 1)})


def test_couple_layout_folders_first_existing_wins(tmp_path: Path) -> None:
    _write_couple(tmp_path / "Office31_mat" / "Amazon_feature_mat.mat", 30)
    _write_couple(tmp_path / "Office31_mat" / "Dslr_feature_mat.mat", 20)
    infos = {info.name: info for info in list_benchmarks(tmp_path)}
    assert infos["office31-a2d"].present and not infos["office31-a2w"].present
    assert infos["office31-a2d"].files[0] == tmp_path / "Office31_mat" / "Amazon_feature_mat.mat"
    # The crossret layout comes first when both exist.
    _write_couple(tmp_path / "office31" / "Amazon_feature_mat.mat", 40)
    infos = {info.name: info for info in list_benchmarks(tmp_path)}
    assert infos["office31-a2d"].files[0] == tmp_path / "office31" / "Amazon_feature_mat.mat"
    split = load_benchmark("office31-a2d", tmp_path)
    assert split.source.n == 40 and split.queries.n == 2 and split.target_train.n == 18
    assert split.protocol["preprocessing"].startswith("none")


def test_unknown_name_suggests_a_close_match() -> None:
    with pytest.raises(ConfigError) as err:
        load_benchmark("digit-m2u")
    message = str(err.value)
    assert "unknown benchmark 'digit-m2u'" in message and "Did you mean 'digits-m2u'?" in message
    for name in ("demo", "office-caltech-surf-a2w", "office31-w2d", "officehome-r2p"):
        assert name in message


def test_missing_files_are_named_with_the_fix(tmp_path: Path) -> None:
    _write_couple(tmp_path / "officehome" / "Art_feature_mat.mat", 10)
    with pytest.raises(DataError) as err:
        load_benchmark("officehome-a2r", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "officehome" / "Real_World_feature_mat.mat") in message
    assert str(tmp_path / "OfficeHome_mat" / "Real_World_feature_mat.mat") in message
    assert "Art_feature_mat" not in message  # present files are not reported missing
    assert "--data-dir" in message and "CROSSRET_DATA" in message


def test_no_data_dir_at_all(no_env: None) -> None:
    with pytest.raises(DataError, match=r"no data directory is set; pass --data-dir .* CROSSRET_DATA"):
        load_benchmark("digits-m2u")


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CROSSRET_DATA", raising=False)
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    with pytest.raises(DataError, match=r"does not exist; pass --data-dir"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("CROSSRET_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other  # the explicit argument wins over the environment
    monkeypatch.setenv("CROSSRET_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"CROSSRET_DATA=.*gone does not exist"):
        resolve_data_dir(None)


# ------------------------------------------------------------------------------------ make_split
def test_fraction_split_is_sklearn_train_test_split_exactly() -> None:
    src, tgt = _indexed_domain(40, "s"), _indexed_domain(95, "t")
    split = make_split(src, tgt, query_fraction=0.1, split_seed=11)
    train_idx, test_idx = train_test_split(np.arange(95), test_size=0.1, random_state=11)
    np.testing.assert_array_equal(split.queries.features[:, 0], test_idx)
    np.testing.assert_array_equal(split.target_train.features[:, 0], train_idx)
    np.testing.assert_array_equal(split.queries.labels, test_idx % 3)
    assert split.queries.n == 10  # ceil(9.5), as sklearn rounds
    assert split.source is src
    assert split.protocol["split_seed"] == 11 and split.protocol["query_fraction"] == 0.1
    assert split.protocol["n_queries"] is None and "train_test_split" in split.protocol["query_rule"]
    assert split.protocol["sizes"] == {"source": 40, "target": 95, "target_train": 85, "queries": 10}


def test_count_split_is_seeded_disjoint_and_complete() -> None:
    src, tgt = _indexed_domain(20, "s"), _indexed_domain(60, "t")
    a = make_split(src, tgt, n_queries=13, split_seed=1)
    b = make_split(src, tgt, n_queries=13, split_seed=1)
    c = make_split(src, tgt, n_queries=13, split_seed=2)
    qa, ta = a.queries.features[:, 0], a.target_train.features[:, 0]
    assert qa.size == 13 and ta.size == 47
    assert set(qa).isdisjoint(ta) and set(qa) | set(ta) == set(range(60))
    np.testing.assert_array_equal(qa, b.queries.features[:, 0])
    assert not np.array_equal(qa, c.queries.features[:, 0])
    assert (np.diff(qa) > 0).all() and (np.diff(ta) > 0).all()  # both parts keep file order
    assert a.protocol["n_queries"] == 13 and a.protocol["query_fraction"] is None


def test_split_records_input_files_and_checksums(tmp_path: Path) -> None:
    paths = []
    for name, n in (("s", 12), ("t", 30)):
        path = tmp_path / f"{name}.npz"
        np.savez(path, features=np.random.default_rng(n).normal(size=(n, 3)), labels=np.arange(n) % 2)
        paths.append(path)
    split = make_split(
        read_domain(paths[0]),
        read_domain(paths[1]),
        benchmark="mine",
        protocol_extra={"preprocessing": "none, checked"},
    )
    assert split.benchmark == "mine"
    assert split.protocol["source_file"] == str(paths[0]) and split.protocol["target_file"] == str(paths[1])
    assert split.protocol["source_sha256"] == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    assert split.protocol["target_sha256"] == hashlib.sha256(paths[1].read_bytes()).hexdigest()
    assert split.protocol["preprocessing"] == "none, checked"
    assert split.summary()["source"] == {"name": "s", "n": 12}  # protocol keys never shadow the summary's


def test_target_too_small_to_split() -> None:
    src = _indexed_domain(10, "s")
    with pytest.raises(DataError, match=r"cannot split 3 samples into 1 queries and 2 .* at least 2 of each"):
        make_split(src, _indexed_domain(3, "t", origin="/d/t.npz"))
    with pytest.raises(DataError, match=r"/d/t.npz: cannot split 10 samples into 9 queries and 1"):
        make_split(src, _indexed_domain(10, "t", origin="/d/t.npz"), n_queries=9)


def test_split_validates_the_pair() -> None:
    single = Domain("s", np.zeros((5, 2)), np.zeros(5, dtype=int), "/d/s.npz")
    with pytest.raises(DataError, match="single class"):
        make_split(single, _indexed_domain(20, "t"))
    with pytest.raises(DataError, match="has 3 features per sample but target"):
        make_split(Domain("s", np.zeros((5, 3)), np.arange(5) % 2), _indexed_domain(20, "t"))
    notes = make_split(_indexed_domain(10, "s", k=2), _indexed_domain(20, "t", k=4)).protocol["notes"]
    assert notes and "[2, 3]" in notes[0]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"query_fraction": 1.5}, "query_fraction must be"),
        ({"query_fraction": 0}, "query_fraction must be"),
        ({"n_queries": 2.5}, "n_queries must be an integer"),
        ({"split_seed": -1}, "split_seed must be"),
        ({"split_seed": "7"}, "split_seed must be"),
    ],
)
def test_bad_split_options(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        make_split(_indexed_domain(10, "s"), _indexed_domain(30, "t"), **kwargs)


# ------------------------------------------------------------------------------------ demo
def _nn_accuracy(
    queries: np.ndarray, q_labels: np.ndarray, db: np.ndarray, db_labels: np.ndarray, leave_one_out: bool = False
) -> float:
    q, d = queries.astype(np.float64), db.astype(np.float64)
    dist = (q**2).sum(1)[:, None] + (d**2).sum(1)[None, :] - 2 * q @ d.T
    if leave_one_out:
        np.fill_diagonal(dist, np.inf)
    return float((db_labels[dist.argmin(1)] == q_labels).mean())


def test_demo_is_deterministic_and_has_a_real_learnable_gap() -> None:
    src, tgt = demo_domains()
    src2, tgt2 = demo_domains()
    np.testing.assert_array_equal(src.features, src2.features)
    np.testing.assert_array_equal(tgt.features, tgt2.features)
    np.testing.assert_array_equal(tgt.labels, tgt2.labels)
    assert (src.n, tgt.n, src.dim) == (898, 899, 64)
    assert src.classes.size == tgt.classes.size == 10
    assert np.abs(np.bincount(src.labels) - np.bincount(tgt.labels)).max() <= 1  # stratified halves
    assert 0 <= tgt.features.min() and tgt.features.max() <= 1
    within_source = _nn_accuracy(src.features, src.labels, src.features, src.labels, leave_one_out=True)
    within_target = _nn_accuracy(tgt.features, tgt.labels, tgt.features, tgt.labels, leave_one_out=True)
    cross = _nn_accuracy(tgt.features, tgt.labels, src.features, src.labels)
    assert within_source > 0.95 and within_target > 0.95  # both domains are clean, clustered digits
    assert 0.35 < cross < within_source - 0.2  # the shift costs a lot but leaves a signal (chance is 0.1)


def test_demo_benchmark_split_depends_on_split_seed_only() -> None:
    a, b, c = load_benchmark("demo"), load_benchmark("demo"), load_benchmark("demo", split_seed=4)
    assert (a.source.n, a.target_train.n, a.queries.n) == (898, 809, 90)
    np.testing.assert_array_equal(a.queries.features, b.queries.features)
    np.testing.assert_array_equal(a.source.features, c.source.features)  # domains do not move
    assert not np.array_equal(a.queries.features, c.queries.features)
    assert a.protocol["split_seed"] == 313 and c.protocol["split_seed"] == 4
    assert a.protocol["source_array_sha256"] == c.protocol["source_array_sha256"]
    assert "gamma 0.7" in a.protocol["preprocessing"]


# ------------------------------------------------------------------------------------ real data
def _sha256sums(root: Path) -> dict[str, str]:
    lines = (root / "SHA256SUMS").read_text().split("\n")
    return {name.removeprefix("./"): digest for digest, name in (ln.split() for ln in lines if ln.strip())}


def test_digits_m2u_real(shared_data: Path) -> None:
    split = load_benchmark("digits-m2u", shared_data)
    assert (split.source.n, split.queries.n, split.target_train.n, split.source.dim) == (2000, 500, 1300, 256)
    target_labels = np.concatenate([split.target_train.labels, split.queries.labels])
    np.testing.assert_array_equal(np.bincount(split.source.labels), [196, 227, 207, 202, 196, 179, 191, 206, 195, 201])
    np.testing.assert_array_equal(np.bincount(target_labels), [352, 241, 165, 166, 166, 126, 139, 172, 129, 144])
    assert split.source.features.min() >= 0 and split.source.features.max() <= 1
    sums = _sha256sums(shared_data)
    assert split.protocol["source_sha256"] == sums["mnist-usps-jda/MNIST_vs_USPS.mat"]
    assert split.protocol["source_variables"] == "X_src/Y_src"
    reversed_split = load_benchmark("digits-u2m", shared_data)
    assert (reversed_split.source.n, reversed_split.queries.n, reversed_split.target_train.n) == (1800, 500, 1500)


def test_office_caltech_surf_a2w_real_uses_training_statistics_only(shared_data: Path) -> None:
    split = load_benchmark("office-caltech-surf-a2w", shared_data)
    assert (split.source.n, split.queries.n, split.target_train.n, split.source.dim) == (958, 30, 265, 800)
    assert split.protocol["split_seed"] == 313 and split.protocol["query_fraction"] == 0.1

    train = np.vstack([split.source.features, split.target_train.features]).astype(np.float64)
    std = train.std(axis=0)
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(std[std > 0], 1, atol=1e-4)

    # Recompute from the raw files: rows / row sum, then z-score with source ∪ target-train only.
    raw_a = read_domain(shared_data / "office-caltech10-surf/amazon_SURF_L10.mat").features.astype(np.float64)
    raw_w = read_domain(shared_data / "office-caltech10-surf/webcam_SURF_L10.mat").features.astype(np.float64)
    raw_a /= raw_a.sum(1, keepdims=True)
    raw_w /= raw_w.sum(1, keepdims=True)
    train_idx, query_idx = train_test_split(np.arange(295), test_size=0.1, random_state=313)
    pool = np.vstack([raw_a, raw_w[train_idx]])
    mean, sd = pool.mean(0), pool.std(0)
    sd[sd == 0] = 1
    np.testing.assert_allclose(split.queries.features, (raw_w[query_idx] - mean) / sd, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(split.source.features, (raw_a - mean) / sd, rtol=1e-4, atol=1e-4)
    # Statistics that include the queries give measurably different features: the check above can fail.
    leaky = np.vstack([raw_a, raw_w])
    leaky_q = (raw_w[query_idx] - leaky.mean(0)) / np.where(leaky.std(0) == 0, 1, leaky.std(0))
    assert np.abs(leaky_q - split.queries.features).max() > 1e-3
