"""The Wikipedia image-text reader and the category-transfer split: the real file matches the data
README (sizes, per-class counts, alignment, disjoint split), and every bad file fails with a message
that names the problem (small synthetic .mat files written by scipy.io.savemat)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse

from crossret.data.crossmodal import (
    WIKIPEDIA_TEST_SIZE,
    WIKIPEDIA_TRAIN_SIZE,
    CrossModalSet,
    category_transfer_split,
    load_wikipedia,
    read_wikipedia_mat,
)
from crossret.errors import DataError

SHARED_DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()
WIKI_FILE = SHARED_DATA / "wikipedia-crossmodal" / "wiki.mat"
# Per-class counts of classes 0..9 from the data README (section "wikipedia-crossmodal/wiki.mat").
TRAIN_COUNTS = [138, 258, 254, 255, 215, 176, 178, 148, 214, 337]
TEST_COUNTS = [34, 102, 86, 78, 52, 60, 59, 37, 71, 114]
SOURCE = (0, 1, 2, 3, 4)


# ------------------------------------------------------------------------------------ real file
@pytest.fixture(scope="module")
def wiki() -> tuple[CrossModalSet, CrossModalSet]:
    if not WIKI_FILE.is_file():
        pytest.skip(f"real Wikipedia file not found at {WIKI_FILE} (shared data absent)")
    return load_wikipedia(SHARED_DATA)


@pytest.mark.shared_data
def test_real_shapes_and_types(wiki: tuple[CrossModalSet, CrossModalSet]) -> None:
    train, test = wiki
    assert (train.n, test.n) == (WIKIPEDIA_TRAIN_SIZE, WIKIPEDIA_TEST_SIZE) == (2173, 693)
    for part in (train, test):
        assert part.image.shape[1] == 128 and part.text.shape[1] == 100
        assert part.image.dtype == np.float32 and part.text.dtype == np.float32
        assert part.labels.dtype == np.int64
        assert part.classes.tolist() == list(range(10))
        assert part.origin == str(WIKI_FILE)


@pytest.mark.shared_data
def test_real_class_counts_match_readme(wiki: tuple[CrossModalSet, CrossModalSet]) -> None:
    train, test = wiki
    assert train.class_counts(10).tolist() == TRAIN_COUNTS
    assert test.class_counts(10).tolist() == TEST_COUNTS


@pytest.mark.shared_data
def test_real_split_is_disjoint_and_rows_are_aligned(wiki: tuple[CrossModalSet, CrossModalSet]) -> None:
    train, test = wiki
    assert np.intersect1d(train.index, test.index).size == 0
    assert np.unique(train.index).size == train.n and np.unique(test.index).size == test.n
    assert np.union1d(train.index, test.index).tolist() == list(range(2866))
    # Independent read, as in the data README: columns are samples, indices are 1-based.
    raw = scipy.io.loadmat(str(WIKI_FILE))["data"][0, 0]
    labels = np.asarray(raw["Y"].todense()).argmax(0)
    ind_train = raw["split"][0, 0]["ind_train"].ravel().astype(np.int64) - 1
    ind_test = raw["split"][0, 0]["ind_test"].ravel().astype(np.int64) - 1
    np.testing.assert_array_equal(train.index, ind_train)
    np.testing.assert_array_equal(test.index, ind_test)
    for part, idx in ((train, ind_train), (test, ind_test)):
        np.testing.assert_array_equal(part.image, raw["X1"].T[idx].astype(np.float32))
        np.testing.assert_array_equal(part.text, raw["X2"].T[idx].astype(np.float32))
        np.testing.assert_array_equal(part.labels, labels[idx])
    # The image features are centred over all 2,866 pairs. (The text features are not, although the
    # data README says so: their per-dimension means reach 0.58; they lie in [-1, 1].)
    image = np.concatenate([train.image, test.image]).astype(np.float64)
    assert np.abs(image.mean(axis=0)).max() < 1e-4
    text = np.concatenate([train.text, test.text])
    assert np.abs(text).max() <= 1.0


@pytest.mark.shared_data
def test_real_category_split_sizes(wiki: tuple[CrossModalSet, CrossModalSet]) -> None:
    train, test = wiki
    parts = category_transfer_split(train, test, SOURCE)
    assert set(parts) == {"source_train", "target_train", "target_test", "source_test"}
    expected = {
        "source_train": sum(TRAIN_COUNTS[:5]),
        "target_train": sum(TRAIN_COUNTS[5:]),
        "target_test": sum(TEST_COUNTS[5:]),
        "source_test": sum(TEST_COUNTS[:5]),
    }
    assert {key: part.n for key, part in parts.items()} == expected == {
        "source_train": 1120, "target_train": 1053, "target_test": 341, "source_test": 352
    }
    assert parts["source_train"].classes.tolist() == [0, 1, 2, 3, 4]
    assert parts["target_train"].classes.tolist() == [5, 6, 7, 8, 9]
    assert parts["target_test"].classes.tolist() == [5, 6, 7, 8, 9]
    assert np.intersect1d(parts["target_train"].index, parts["target_test"].index).size == 0


# ------------------------------------------------------------------------------------ synthetic files
N, D_IMG, D_TXT, K = 12, 6, 4, 3
TRAIN_IDX = np.arange(1, 9)  # 1-based, as in MATLAB
TEST_IDX = np.arange(9, 13)


def _labels(n: int = N) -> np.ndarray:
    return np.arange(n) % K


def _fields(n: int = N) -> dict:
    rng = np.random.default_rng(3)
    onehot = np.zeros((K, n), dtype=bool)
    onehot[_labels(n), np.arange(n)] = True
    return {
        "X1": np.round(rng.normal(size=(D_IMG, n)) * 64) / 64,  # exact in float32
        "X2": np.round(rng.normal(size=(D_TXT, n)) * 64) / 64,
        "Y": scipy.sparse.csc_matrix(onehot),
        "split": {"ind_train": TRAIN_IDX.astype(np.uint16), "ind_test": TEST_IDX.astype(np.uint16)},
    }


def _write(root: Path, fields: dict | None = None, variables: dict | None = None) -> Path:
    path = root / "wikipedia-crossmodal" / "wiki.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), variables if variables is not None else {"data": fields or _fields()})
    return path


def test_synthetic_round_trip(tmp_path: Path) -> None:
    fields = _fields()
    _write(tmp_path, fields)
    train, test = load_wikipedia(tmp_path)
    assert (train.n, test.n) == (8, 4)
    np.testing.assert_array_equal(train.index, TRAIN_IDX - 1)
    np.testing.assert_array_equal(train.image, fields["X1"].T[TRAIN_IDX - 1])
    np.testing.assert_array_equal(test.text, fields["X2"].T[TEST_IDX - 1])
    np.testing.assert_array_equal(test.labels, _labels()[TEST_IDX - 1])
    assert train.name == "wikipedia/train" and test.name == "wikipedia/test"


def test_data_dir_from_environment_and_direct_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path)
    monkeypatch.setenv("CROSSRET_DATA", str(tmp_path))
    assert load_wikipedia()[0].n == 8
    # The folder that holds wiki.mat itself is accepted too.
    assert load_wikipedia(path.parent)[1].n == 4


def test_missing_file_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_wikipedia(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "wikipedia-crossmodal" / "wiki.mat") in message
    assert "--data-dir" in message and "CROSSRET_DATA" in message


def test_no_data_dir_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CROSSRET_DATA", raising=False)
    with pytest.raises(DataError, match=r"no data directory is set.*--data-dir.*CROSSRET_DATA"):
        load_wikipedia()


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_wikipedia(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"image,text,label\n1,2,3\n" * 20, "not a MATLAB"),
        (b"\x89HDF\r\n\x1a\n" + b"\x00" * 600, "v7.3"),
    ],
    ids=["empty", "csv-text", "hdf5"],
)
def test_not_a_mat_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "wikipedia-crossmodal" / "wiki.mat"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_wikipedia(tmp_path)


def test_truncated_mat_file(tmp_path: Path) -> None:
    path = _write(tmp_path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_wikipedia_mat(path)


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _bad_fields() -> list:
    base = _fields()
    split = base["split"]
    both_labels = base["Y"].toarray()
    both_labels[:, 0] = True
    return [
        pytest.param({"other": np.ones(3)}, "no variable 'data'.*other", id="no-data-variable"),
        pytest.param({"data": np.ones((2, 2))}, "'?data'? is not a struct", id="data-not-struct"),
        pytest.param({"data": _without(base, "X2")}, "lacks field.*X2", id="missing-X2"),
        pytest.param({"data": _without(base, "split")}, "lacks field.*split", id="missing-split"),
        pytest.param(
            {"data": {**base, "split": _without(split, "ind_test")}}, "data.split lacks field.*ind_test",
            id="missing-ind_test",
        ),
        pytest.param({"data": {**base, "split": np.arange(3)}}, "data.split is not a struct", id="split-not-struct"),
        pytest.param({"data": {**base, "X2": base["X2"][:, :-1]}}, "different numbers of columns", id="X2-columns"),
        pytest.param({"data": {**base, "Y": base["Y"][:, :-2]}}, "different numbers of columns", id="Y-columns"),
        pytest.param({"data": {**base, "X1": "text"}}, "X1 is not a numeric array", id="X1-string"),
        pytest.param({"data": {**base, "Y": both_labels}}, "exactly one label per column", id="Y-two-labels"),
        pytest.param({"data": {**base, "Y": both_labels * 2.0}}, "other than 0 and 1", id="Y-not-binary"),
        pytest.param(
            {"data": {**base, "split": {**split, "ind_test": np.array([9, 10, 13])}}}, r"out of range 1\.\.12.*13",
            id="index-too-large",
        ),
        pytest.param(
            {"data": {**base, "split": {**split, "ind_train": np.arange(0, 8)}}}, "1-based", id="index-zero",
        ),
        pytest.param(
            {"data": {**base, "split": {**split, "ind_test": np.array([8, 9, 10])}}}, r"overlap.*\[8\]",
            id="overlap",
        ),
        pytest.param(
            {"data": {**base, "split": {**split, "ind_test": np.array([9, 9, 10])}}}, "more than once",
            id="repeated-index",
        ),
        pytest.param(
            {"data": {**base, "split": {**split, "ind_test": np.array([9.5, 10.0])}}}, "non-integer",
            id="fractional-index",
        ),
        pytest.param(
            {"data": {**base, "split": {**split, "ind_test": np.zeros((0,))}}}, "ind_test is empty", id="empty-split",
        ),
    ]


@pytest.mark.parametrize(("variables", "message"), _bad_fields())
def test_bad_contents(tmp_path: Path, variables: dict, message: str) -> None:
    path = _write(tmp_path, variables=variables)
    with pytest.raises(DataError, match=message) as info:
        load_wikipedia(tmp_path)
    assert str(path) in str(info.value)


def test_nan_features_are_rejected(tmp_path: Path) -> None:
    fields = _fields()
    fields["X2"][1, TRAIN_IDX[2] - 1] = np.nan
    _write(tmp_path, fields)
    with pytest.raises(DataError, match=r"1 pair.*NaN or inf text features"):
        load_wikipedia(tmp_path)


# ------------------------------------------------------------------------------------ CrossModalSet
def _set(n: int = 10, labels: np.ndarray | None = None) -> CrossModalSet:
    rng = np.random.default_rng(0)
    return CrossModalSet(
        image=rng.normal(size=(n, 3)),
        text=rng.normal(size=(n, 2)),
        labels=np.arange(n) % 4 if labels is None else labels,
        name="toy",
        index=np.arange(n) + 100,
    )


def test_set_converts_types() -> None:
    data = _set()
    assert data.image.dtype == np.float32 and data.text.dtype == np.float32 and data.labels.dtype == np.int64
    assert (data.n, data.image_dim, data.text_dim, len(data)) == (10, 3, 2, 10)
    assert data.class_counts().tolist() == [3, 3, 2, 2]
    assert data.to_domain("text").features.shape == (10, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": np.ones((4, 3)), "text": np.ones((5, 2)), "labels": np.zeros(4)}, "4 image rows but 5 text rows"),
        ({"image": np.ones(4), "text": np.ones((4, 2)), "labels": np.zeros(4)}, "image features must be a 2-D"),
        ({"image": np.ones((4, 3)), "text": np.ones((4, 2)), "labels": np.zeros(3)}, "3 labels for 4 pairs"),
        ({"image": np.full((4, 3), np.inf), "text": np.ones((4, 2)), "labels": np.zeros(4)}, "NaN or inf image"),
        ({"image": np.ones((0, 3)), "text": np.ones((0, 2)), "labels": np.zeros(0)}, "empty"),
        ({"image": np.ones((4, 3)), "text": np.ones((4, 2)), "labels": np.full(4, 0.5)}, "integers"),
        ({"image": np.ones((2, 1)), "text": np.ones((2, 1)), "labels": [0, -2]}, ">= 0"),
        ({"image": np.ones((2, 1)), "text": np.ones((2, 1)), "labels": [0, 1], "index": [0]}, "index must be"),
    ],
)
def test_set_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        CrossModalSet(**kwargs)


def test_subset_by_mask_and_index() -> None:
    data = _set()
    by_mask = data.subset(data.labels == 1, name="ones")
    assert by_mask.name == "ones" and by_mask.labels.tolist() == [1, 1, 1]
    assert by_mask.index.tolist() == [101, 105, 109]
    np.testing.assert_array_equal(by_mask.image, data.image[[1, 5, 9]])
    by_index = data.subset([9, 0, -1])
    assert by_index.index.tolist() == [109, 100, 109]
    np.testing.assert_array_equal(by_index.text, data.text[[9, 0, 9]])


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        (np.ones(3, dtype=bool), "one entry per pair"),
        ([0, 10], "out of range"),
        ([0.5], "boolean mask or integer"),
        (np.zeros(10, dtype=bool), "selection is empty"),
        ([], "selection is empty"),
    ],
)
def test_subset_errors(selector: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        _set().subset(selector)


# ------------------------------------------------------------------------------------ category split
def test_category_split_on_toy_data() -> None:
    train, test = _set(20), _set(8)
    parts = category_transfer_split(train, test, source_classes=[2, 0])
    assert parts["source_train"].classes.tolist() == [0, 2]
    assert parts["target_train"].classes.tolist() == [1, 3]
    assert parts["target_test"].classes.tolist() == [1, 3]
    assert parts["source_test"].classes.tolist() == [0, 2]
    assert parts["source_train"].n + parts["target_train"].n == 20
    assert parts["source_test"].n + parts["target_test"].n == 8
    assert parts["target_train"].name == "toy/target_train"


@pytest.mark.parametrize(
    ("source_classes", "message"),
    [
        ((), "empty"),
        ((0, 1, 2, 3), "proper subset"),
        ((0, 7), r"\[7\] are not labels of the data"),
        ((0, 0), "more than once"),
        ((True,), "integer class labels"),
        ((1.0,), "integer class labels"),
        ("01", "list of class labels"),
    ],
)
def test_category_split_validates_classes(source_classes: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        category_transfer_split(_set(), _set(), source_classes)


def test_category_split_rejects_empty_parts_and_unlabelled_or_mismatched_sets() -> None:
    test_without_class_3 = _set(3)  # labels 0, 1, 2
    with pytest.raises(DataError, match="leaves target_test empty"):
        category_transfer_split(_set(), test_without_class_3, (0, 1, 2))
    unlabelled = _set(labels=np.full(10, -1))
    with pytest.raises(DataError, match="unknown labels"):
        category_transfer_split(_set(), unlabelled)
    other = CrossModalSet(np.ones((4, 5)), np.ones((4, 2)), np.arange(4))
    with pytest.raises(DataError, match="image/text sizes"):
        category_transfer_split(_set(), other, (0,))
