"""Feature-file readers: every format round-trips exactly, every bad input fails with a message
that names the file and the fix."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from crossret.data import Domain, check_pair, detect_format, read_domain, read_domain_pair
from crossret.errors import ConfigError, DataError

RNG = np.random.default_rng(7)


def _features(n: int = 12, d: int = 5) -> np.ndarray:
    # float64 with values that float32 represents exactly, so equality checks are exact.
    return np.round(RNG.normal(size=(n, d)) * 64) / 64


def _labels(n: int = 12, k: int = 3, start: int = 0) -> np.ndarray:
    return (np.arange(n) % k + start).astype(np.int64)


def write_mat73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A MATLAB v7.3-style file: HDF5 behind a 512-byte MATLAB header, arrays stored transposed
    (MATLAB is column-major, so h5py sees every MATLAB array with its axes reversed)."""
    with h5py.File(path, "w", userblock_size=512) as handle:
        for key, value in arrays.items():
            handle.create_dataset(key, data=np.asarray(value).T)
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with path.open("r+b") as handle:
        handle.write(header)


# ------------------------------------------------------------------------------------ formats
def test_npz_roundtrip_labels_taken_as_is(tmp_path: Path) -> None:
    x, y = _features(), _labels(start=1)  # 1..3: not a MATLAB family, so kept as they are
    path = tmp_path / "dom.npz"
    np.savez(path, features=x, labels=y)
    dom = read_domain(path)
    assert detect_format(path) == "npz:features"
    assert dom.features.dtype == np.float32 and dom.labels.dtype == np.int64
    np.testing.assert_array_equal(dom.features, x.astype(np.float32))
    np.testing.assert_array_equal(dom.labels, y)
    assert dom.name == "dom" and dom.origin == str(path)


def test_couple_mat_float64_n_by_1_one_based(tmp_path: Path) -> None:
    x, y = _features(10, 7), _labels(10, 4, start=1)
    path = tmp_path / "Amazon_feature_mat.mat"
    scipy.io.savemat(path, {"deepfea": x, "label": y.reshape(-1, 1)})
    dom = read_domain(path, name="amazon")
    assert detect_format(path) == "mat-v5:couple"
    assert dom.features.dtype == np.float32 and dom.features.shape == (10, 7)
    np.testing.assert_array_equal(dom.features, x.astype(np.float32))
    np.testing.assert_array_equal(dom.labels, y - 1)
    assert dom.name == "amazon"


def test_couple_mat_one_by_n_zero_based_kept(tmp_path: Path) -> None:
    x, y = _features(9, 3), _labels(9, 3, start=0)
    path = tmp_path / "c.mat"
    scipy.io.savemat(path, {"deepfea": x, "label": y.reshape(1, -1)})
    np.testing.assert_array_equal(read_domain(path).labels, y)


def test_explicit_label_base_overrides_auto(tmp_path: Path) -> None:
    x, y = _features(6, 2), np.array([1, 2, 3, 1, 2, 3])
    path = tmp_path / "c.mat"
    scipy.io.savemat(path, {"deepfea": x, "label": y})
    np.testing.assert_array_equal(read_domain(path, label_base=0).labels, y)
    np.testing.assert_array_equal(read_domain(path, label_base=1).labels, y - 1)
    # An npz is taken as it is with "auto" but an explicit base still applies.
    npz = tmp_path / "d.npz"
    np.savez(npz, features=x, labels=y)
    np.testing.assert_array_equal(read_domain(npz).labels, y)
    np.testing.assert_array_equal(read_domain(npz, label_base=1).labels, y - 1)


def test_one_based_shift_keeps_unknown_labels(tmp_path: Path) -> None:
    path = tmp_path / "c.mat"
    scipy.io.savemat(path, {"deepfea": _features(4, 2), "label": np.array([1, 2, -1, 2])})
    np.testing.assert_array_equal(read_domain(path).labels, [0, 1, -1, 1])


def test_label_base_one_with_a_zero_label_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.mat"
    scipy.io.savemat(path, {"deepfea": _features(4, 2), "label": np.array([0, 1, 2, 1])})
    with pytest.raises(DataError, match=r"label_base=1 but 'label' contains the label 0") as err:
        read_domain(path, label_base=1)
    assert str(path) in str(err.value)


def test_jda_columns_are_samples_and_role_picks_the_half(tmp_path: Path) -> None:
    xs, xt = _features(8, 4), _features(6, 4)  # samples x dims; the file stores dims x samples
    ys, yt = _labels(8, 2, start=1), _labels(6, 3, start=1)
    path = tmp_path / "A_vs_B.mat"
    scipy.io.savemat(path, {"X_src": xs.T, "Y_src": ys.reshape(-1, 1), "X_tar": xt.T, "Y_tar": yt.reshape(-1, 1)})
    assert detect_format(path) == "mat-v5:jda"
    src = read_domain(path, role="source")
    tgt = read_domain(path, role="target")
    np.testing.assert_array_equal(src.features, xs.astype(np.float32))
    np.testing.assert_array_equal(src.labels, ys - 1)
    np.testing.assert_array_equal(tgt.features, xt.astype(np.float32))
    np.testing.assert_array_equal(tgt.labels, yt - 1)
    assert (src.name, tgt.name) == ("A_vs_B/src", "A_vs_B/tar")


def test_jda_without_role_says_to_pass_role(tmp_path: Path) -> None:
    path = tmp_path / "jda.mat"
    scipy.io.savemat(
        path, {"X_src": _features(3, 4), "Y_src": [1, 2, 1, 2], "X_tar": _features(3, 4), "Y_tar": [1, 2, 1, 2]}
    )
    with pytest.raises(DataError) as err:
        read_domain(path)
    message = str(err.value)
    assert str(path) in message and "two domains" in message
    assert "role='source'" in message and "--source" in message


def test_jda_row_major_array_gets_a_transpose_hint(tmp_path: Path) -> None:
    path = tmp_path / "jda.mat"
    x = _features(5, 3)  # samples x dims: the wrong way round for JDA
    scipy.io.savemat(path, {"X_src": x, "Y_src": [1, 2, 1, 2, 1], "X_tar": x, "Y_tar": [1, 2, 1, 2, 1]})
    with pytest.raises(DataError, match="one sample per column"):
        read_domain(path, role="source")


def test_surf_uint8_counts(tmp_path: Path) -> None:
    fts = RNG.integers(0, 50, size=(7, 800)).astype(np.uint8)
    labels = np.array([1, 2, 3, 4, 5, 6, 10], dtype=np.uint8).reshape(-1, 1)
    path = tmp_path / "webcam_SURF_L10.mat"
    scipy.io.savemat(path, {"fts": fts, "labels": labels})
    dom = read_domain(path)
    assert detect_format(path) == "mat-v5:surf"
    assert dom.features.dtype == np.float32
    np.testing.assert_array_equal(dom.features, fts.astype(np.float32))
    np.testing.assert_array_equal(dom.labels, [0, 1, 2, 3, 4, 5, 9])


def test_decaf_mat(tmp_path: Path) -> None:
    x, y = _features(5, 6), np.array([[1], [1], [2], [2], [3]])
    path = tmp_path / "dslr_decaf.mat"
    scipy.io.savemat(path, {"feas": x, "labels": y})
    dom = read_domain(path)
    assert detect_format(path) == "mat-v5:decaf"
    np.testing.assert_array_equal(dom.features, x.astype(np.float32))
    np.testing.assert_array_equal(dom.labels, [0, 0, 1, 1, 2])


def test_h5_data_target_not_transposed(tmp_path: Path) -> None:
    x, y = _features(9, 4), _labels(9, 3, start=1)
    path = tmp_path / "dom.h5"
    with h5py.File(path, "w") as handle:
        handle["data"] = x
        handle["target"] = y
    dom = read_domain(path)
    assert detect_format(path) == "hdf5:data-target"
    np.testing.assert_array_equal(dom.features, x.astype(np.float32))
    np.testing.assert_array_equal(dom.labels, y)  # not a MATLAB family: 1..3 kept


def test_hdf5_extension_also_accepted(tmp_path: Path) -> None:
    path = tmp_path / "dom.hdf5"
    with h5py.File(path, "w") as handle:
        handle["data"] = _features(4, 2)
        handle["target"] = [0, 1, 0, 1]
    assert read_domain(path).n == 4


def test_mat73_couple_is_transposed_back(tmp_path: Path) -> None:
    x, y = _features(11, 4), _labels(11, 3, start=1)
    path = tmp_path / "Art_feature_mat.mat"
    write_mat73(path, {"deepfea": x, "label": y.reshape(-1, 1)})
    with h5py.File(path, "r") as handle:  # the fixture really stores MATLAB's transposed layout
        assert handle["deepfea"].shape == (4, 11)
    assert detect_format(path) == "mat-v7.3:couple"
    dom = read_domain(path)
    np.testing.assert_array_equal(dom.features, x.astype(np.float32))
    np.testing.assert_array_equal(dom.labels, y - 1)


def test_mat73_jda(tmp_path: Path) -> None:
    xs, xt = _features(6, 3), _features(5, 3)
    path = tmp_path / "jda73.mat"
    write_mat73(
        path,
        {
            "X_src": xs.T,
            "Y_src": _labels(6, 2, 1).reshape(-1, 1),
            "X_tar": xt.T,
            "Y_tar": _labels(5, 2, 1).reshape(-1, 1),
        },
    )
    np.testing.assert_array_equal(read_domain(path, role="target").features, xt.astype(np.float32))
    np.testing.assert_array_equal(read_domain(path, role="source").labels, _labels(6, 2, 0))


def test_csv_without_header(tmp_path: Path) -> None:
    x, y = _features(5, 3), _labels(5, 2)
    path = tmp_path / "dom.csv"
    np.savetxt(path, np.column_stack([x, y]), delimiter=",")
    dom = read_domain(path)
    assert detect_format(path) == "csv:csv"
    np.testing.assert_array_equal(dom.features, x.astype(np.float32))
    np.testing.assert_array_equal(dom.labels, y)


def test_csv_with_header(tmp_path: Path) -> None:
    path = tmp_path / "dom.csv"
    path.write_text("f1,f2,label\n0.5,1,2\n-1,2.25,0\n3,4,1\n")
    dom = read_domain(path)
    np.testing.assert_array_equal(dom.features, [[0.5, 1], [-1, 2.25], [3, 4]])
    np.testing.assert_array_equal(dom.labels, [2, 0, 1])


# ------------------------------------------------------------------------------------ bad input
def test_missing_keys_lists_found_and_looked_for(tmp_path: Path) -> None:
    path = tmp_path / "odd.npz"
    np.savez(path, X=_features(), y=_labels())
    with pytest.raises(DataError) as err:
        read_domain(path)
    message = str(err.value)
    assert str(path) in message
    assert "keys found: X, y" in message
    for wanted in (
        "features+labels (npz)",
        "deepfea+label (COUPLE .mat)",
        "X_src/Y_src/X_tar/Y_tar (JDA .mat)",
        "fts+labels (SURF .mat)",
        "feas+labels (DeCAF .mat)",
        "data+target (.h5)",
    ):
        assert wanted in message


def test_missing_keys_in_mat_hides_matlab_internals(tmp_path: Path) -> None:
    path = tmp_path / "half.mat"
    scipy.io.savemat(path, {"deepfea": _features()})  # no 'label'
    with pytest.raises(DataError, match=r"keys found: deepfea; looked for") as err:
        detect_format(path)
    assert "__header__" not in str(err.value)


def test_features_not_2d(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, features=np.zeros((4, 2, 2)), labels=_labels(4))
    with pytest.raises(DataError, match=r"'features' must be a 2-D array .* shape \(4, 2, 2\)") as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_labels_not_a_vector(tmp_path: Path) -> None:
    path = tmp_path / "bad.mat"
    scipy.io.savemat(path, {"deepfea": _features(4, 2), "label": np.ones((4, 3))})
    with pytest.raises(DataError, match=r"'label' must be a vector of labels .* shape \(4, 3\)"):
        read_domain(path)


def test_label_count_differs_from_sample_count(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, features=np.zeros((100, 3)), labels=_labels(99))
    with pytest.raises(DataError) as err:
        read_domain(path)
    message = str(err.value)
    assert str(path) in message and "has 100 samples but 'labels' has 99 labels" in message


def test_nan_and_inf_rows_are_counted(tmp_path: Path) -> None:
    x = _features(6, 3)
    x[1, 0], x[1, 2], x[4, 1] = np.nan, np.inf, -np.inf
    path = tmp_path / "nan.npz"
    np.savez(path, features=x, labels=_labels(6))
    with pytest.raises(DataError, match=r"2 sample\(s\) have NaN or inf features") as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mat"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty \(0 bytes\)") as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_zero_samples(tmp_path: Path) -> None:
    path = tmp_path / "none.npz"
    np.savez(path, features=np.zeros((0, 4)), labels=np.zeros(0, dtype=np.int64))
    with pytest.raises(DataError, match=r"empty \(0 samples\)") as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_csv_with_only_a_header_has_no_samples(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("a,b,label\n")
    with pytest.raises(DataError, match="no data rows"):
        read_domain(path)


@pytest.mark.parametrize("ext", [".mat", ".npz", ".h5"])
def test_random_bytes_are_a_clear_corrupt_file_error(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"junk{ext}"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="not a valid") as err:
        read_domain(path)
    assert str(path) in str(err.value) and "corrupt" in str(err.value)


def test_truncated_npz(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, features=_features(50, 20), labels=_labels(50))
    path = tmp_path / "cut.npz"
    path.write_bytes(good.read_bytes()[:200])  # keeps the zip signature, loses the directory
    with pytest.raises(DataError, match=r"not a valid \.npz") as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, features=np.array([[1.0], [2.0]], dtype=object), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="Python objects"):
        read_domain(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="file not found") as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "features.txt"
    path.write_text("1,2,0\n")
    with pytest.raises(DataError) as err:
        read_domain(path)
    message = str(err.value)
    assert str(path) in message and "'.txt'" in message
    assert ".npz" in message and ".csv" in message


def test_non_integer_labels(tmp_path: Path) -> None:
    path = tmp_path / "soft.mat"
    scipy.io.savemat(path, {"deepfea": _features(4, 2), "label": np.array([0.0, 1.5, 2.0, 0.25])})
    with pytest.raises(DataError, match=r"2 value\(s\) are not integers") as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_nan_labels(tmp_path: Path) -> None:
    path = tmp_path / "nanlab.npz"
    np.savez(path, features=_features(3, 2), labels=np.array([0.0, np.nan, 1.0]))
    with pytest.raises(DataError, match="not integers"):
        read_domain(path)


def test_ragged_csv(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("1,2,0\n3,1\n")
    with pytest.raises(DataError, match="same number of numeric fields") as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_string_array_is_not_numeric(tmp_path: Path) -> None:
    path = tmp_path / "str.npz"
    np.savez(path, features=np.array([["a", "b"], ["c", "d"]]), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="'features' is not a numeric array"):
        read_domain(path)


# ------------------------------------------------------------------------------------ check_pair
def _dom(name: str, x: np.ndarray, y: np.ndarray) -> Domain:
    return Domain(name, x, y, origin=f"/data/{name}.npz")


def test_check_pair_feature_sizes_differ() -> None:
    with pytest.raises(DataError) as err:
        check_pair(_dom("a", np.zeros((4, 3)), _labels(4, 2)), _dom("b", np.zeros((4, 5)), _labels(4, 2)))
    message = str(err.value)
    assert "/data/a.npz has 3 features" in message and "/data/b.npz has 5" in message


def test_check_pair_single_class_source() -> None:
    with pytest.raises(DataError, match=r"/data/a.npz: all samples have a single class \(2\)"):
        check_pair(_dom("a", np.zeros((4, 3)), np.full(4, 2)), _dom("b", np.zeros((4, 3)), _labels(4, 2)))


def test_check_pair_unlabelled_source_and_target() -> None:
    good = _dom("a", np.zeros((4, 3)), _labels(4, 2))
    hidden = _dom("b", np.zeros((4, 3)), np.array([0, -1, 1, -1]))
    with pytest.raises(DataError, match=r"target /data/b.npz: 2 of 4 samples have unknown labels"):
        check_pair(good, hidden)
    with pytest.raises(DataError, match=r"source /data/b.npz: 2 of 4 samples have unknown labels"):
        check_pair(hidden, good)


def test_check_pair_notes_target_classes_missing_from_source() -> None:
    src = _dom("a", np.zeros((4, 3)), np.array([0, 1, 0, 1]))
    tgt = _dom("b", np.zeros((4, 3)), np.array([0, 1, 2, 3]))
    notes = check_pair(src, tgt)
    assert len(notes) == 1 and "[2, 3]" in notes[0]
    assert check_pair(tgt, src) == []


def test_values_beyond_float32_range(tmp_path: Path) -> None:
    x = _features(4, 2)
    x[2, 1] = 1e300
    path = tmp_path / "huge.npz"
    np.savez(path, features=x, labels=_labels(4))
    with pytest.raises(DataError, match=r"beyond the float32 range .* in 1 sample"):
        read_domain(path)


def test_bad_role_or_label_base_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, features=_features(4, 2), labels=_labels(4))
    with pytest.raises(ConfigError, match="role must be 'source' or 'target'"):
        read_domain(path, role="src")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="label_base must be 'auto', 0 or 1"):
        read_domain(path, label_base=2)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- pair label base
def _save_couple(path, labels, dim=3):
    labels = np.asarray(labels)
    scipy.io.savemat(path, {"deepfea": np.ones((labels.size, dim)), "label": labels.reshape(-1, 1)})
    return path


def test_pair_label_base_is_decided_once_for_both_files(tmp_path):
    # a 0-based target that lacks class 0 must not be shifted on its own
    src = _save_couple(tmp_path / "s.mat", [0, 1, 2, 3, 3])
    tgt = _save_couple(tmp_path / "t.mat", [1, 2, 3, 3])
    source, target, bases = read_domain_pair(src, tgt)
    assert bases == {"source_label_base": 0, "target_label_base": 0}
    np.testing.assert_array_equal(target.labels, [1, 2, 3, 3])
    # both 1-based: both shifted
    src1 = _save_couple(tmp_path / "s1.mat", [1, 2, 3])
    tgt1 = _save_couple(tmp_path / "t1.mat", [2, 3, 3])
    source, target, bases = read_domain_pair(src1, tgt1)
    assert bases == {"source_label_base": 1, "target_label_base": 1}
    np.testing.assert_array_equal(source.labels, [0, 1, 2])
    np.testing.assert_array_equal(target.labels, [1, 2, 2])
    # explicit base wins
    _, target, bases = read_domain_pair(src1, tgt1, label_base=0)
    np.testing.assert_array_equal(target.labels, [2, 3, 3])


def test_pair_of_mixed_formats_with_ambiguous_base_is_refused(tmp_path):
    src = _save_couple(tmp_path / "s.mat", [1, 2, 3])
    np.savez(tmp_path / "t.npz", features=np.ones((3, 3)), labels=np.array([1, 2, 3]))
    with pytest.raises(DataError, match="--label-base"):
        read_domain_pair(src, tmp_path / "t.npz")
    _, target, _ = read_domain_pair(src, tmp_path / "t.npz", label_base=1)
    np.testing.assert_array_equal(target.labels, [0, 1, 2])


def test_csv_first_row_with_one_bad_field_is_an_error_not_a_header(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("1,2,a\n3,4,1\n5,6,0\n")
    with pytest.raises(DataError, match=r"bad\.csv"):
        read_domain(path)


# ------------------------------------------------------------------------------------ bounded reads
def test_csv_line_longer_than_the_bound_is_refused_before_parsing(tmp_path, monkeypatch):
    """A file without line breaks would be read whole by readline / np.loadtxt: the line length is
    bounded by a streaming scan first."""
    import crossret.data.readers as readers

    monkeypatch.setattr(readers, "MAX_CSV_LINE_BYTES", 100)
    parsed = []
    monkeypatch.setattr(readers.np, "loadtxt", lambda *a, **k: parsed.append(a) or np.zeros((1, 2)))
    path = tmp_path / "one_line.csv"
    path.write_text("1," * 60 + "0")  # 121 bytes, no line break
    with pytest.raises(DataError, match=r"one_line\.csv: line 1 is longer than 100 bytes"):
        read_domain(path)
    path.write_text("1,2,0\n" * 3 + "1," * 60 + "0\n" + "1,2,0\n")  # the 4th line is too long
    with pytest.raises(DataError, match=r"line 4 is longer"):
        read_domain(path)
    assert parsed == [], "the file was parsed before its lines were checked"


def test_csv_lines_across_read_blocks_are_measured_whole(tmp_path, monkeypatch):
    import crossret.data.readers as readers

    monkeypatch.setattr(readers, "MAX_CSV_LINE_BYTES", 1 << 20)
    path = tmp_path / "long.csv"
    row = ("0.5," * 200_000 + "1\n").encode()  # 800 kB lines: every 1 MiB block boundary cuts one
    path.write_bytes(row * 3)
    domain = read_domain(path)
    assert domain.features.shape == (3, 200_000)
    path.write_bytes(row + b"0.5," * 300_000 + b"1\n")  # 1.2 MB, split across blocks 0 and 1
    with pytest.raises(DataError, match="line 2 is longer"):
        read_domain(path)


def test_csv_too_large_for_memory_is_refused_naming_the_file(tmp_path, monkeypatch):
    import crossret.limits as limits

    path = tmp_path / "big.csv"
    path.write_text("1,2,0\n" * 600_000)  # 3.6 MB
    monkeypatch.setattr(limits, "available_memory", lambda: 1000)
    with pytest.raises(DataError, match=r"big\.csv: parsing this .* CSV file needs about"):
        read_domain(path)


def _deflated_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, **arrays)


def test_npz_shapes_are_compared_before_any_array_is_inflated(tmp_path, monkeypatch):
    """A small archive declaring a large features array next to mismatched labels, or a source whose
    feature size differs from the target's, is refused from the .npy headers alone."""
    import crossret.data.readers as readers

    def never(*args, **kwargs):
        raise AssertionError("an array was inflated before the shapes were compared")

    bomb = tmp_path / "bomb.npz"
    _deflated_npz(bomb, {"features": np.zeros((20_000, 500), np.float32), "labels": np.zeros(10, np.int64)})
    assert bomb.stat().st_size < 200_000  # 40 MB of zeros
    small = tmp_path / "small.npz"
    np.savez(small, features=np.zeros((30, 8), np.float32), labels=np.arange(30) % 3)
    wide = tmp_path / "wide.npz"
    _deflated_npz(wide, {"features": np.zeros((2_000, 5_000), np.float32), "labels": np.arange(2_000) % 3})
    monkeypatch.setattr(readers, "load_npz_array", never)
    with pytest.raises(DataError, match=r"bomb\.npz: 'features' has 20000 samples but 'labels' has 10 labels"):
        read_domain(bomb)
    with pytest.raises(DataError, match=r"source .*wide\.npz has 5000 features per sample but target .*small\.npz"):
        read_domain_pair(wide, small)
    with pytest.raises(DataError, match=r"source .*wide\.npz has 5000 features per sample"):
        read_domain_pair(wide, small, label_base=0)
    with pytest.raises(DataError, match=r"bomb\.npz: 'features' has 20000 samples"):
        read_domain_pair(small, bomb)


def test_npz_declared_features_beyond_memory_are_refused_naming_the_file(tmp_path, monkeypatch):
    import crossret.data.readers as readers
    import crossret.limits as limits

    path = tmp_path / "big.npz"
    _deflated_npz(path, {"features": np.zeros((2_000, 1_000), np.float32), "labels": np.zeros(2_000, np.int64)})
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 20)
    monkeypatch.setattr(readers, "load_npz_array", lambda *a, **k: pytest.fail("inflated"))
    with pytest.raises(DataError, match=r"big\.npz: 2000 x 1000 features needs about .* only 1\.0 MiB"):
        read_domain(path)


def test_npz_declared_dtype_is_checked_before_reading(tmp_path, monkeypatch):
    import crossret.data.readers as readers

    path = tmp_path / "text.npz"
    np.savez(path, features=np.array([["a", "b"]] * 4), labels=np.arange(4))
    monkeypatch.setattr(readers, "load_npz_array", lambda *a, **k: pytest.fail("inflated"))
    with pytest.raises(DataError, match=r"'features' is not a numeric array \(dtype <U1\)"):
        read_domain(path)
