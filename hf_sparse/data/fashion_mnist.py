"""Built-in image classification data: Fashion-MNIST from local IDX files, plus a generic loader.

Fashion-MNIST (Zalando, MIT licence) ships in Debian's package ``dataset-fashion-mnist`` as four
gzip-compressed IDX files. :func:`load_fashion_mnist` parses them with numpy, turns them into a
``datasets.Dataset`` with a real ``Image`` feature and a ``ClassLabel`` feature (the same schema as
the Hub's ``zalando-datasets/fashion_mnist``) and caches the Arrow data on disk, so only the very
first call pays the (about one second) build.

:func:`load_image_classification_dataset` gives every source (the built-in data, a Hub data set, a
local ``imagefolder``) the same two columns, ``image`` and ``label``, that the transforms expect.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from ..logging_utils import get_logger

logger = get_logger(__name__)

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_HUB_NAME",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "fashion_mnist_features",
    "hf_sparse_cache_dir",
    "load_fashion_mnist",
    "load_image_classification_dataset",
    "prepare_image_classification_columns",
    "read_idx",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: The same data on the Hugging Face Hub, for machines that are online.
FASHION_MNIST_HUB_NAME = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Per-channel statistics of the 60k training images scaled to [0, 1] (computed: 0.28604, 0.35302;
# tests/test_data.py recomputes them).
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)

_SPLIT_FILE_PREFIX = {"train": "train", "test": "t10k"}
_SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_IMAGE_SIZE = 28
_ENV_DATA_DIR = "HF_SPARSE_FASHION_MNIST_DIR"
_ENV_CACHE = "HF_SPARSE_CACHE"
# Bump when the cached Arrow layout changes: old caches are then ignored, never misread.
_CACHE_FORMAT_VERSION = 1
# zlib level 0 ("stored") makes encoding 60k PNGs ~6x faster than level 1 (0.3 s vs 1.7 s here);
# the cost is ~850 instead of ~520 bytes per 28x28 image, i.e. ~60 MB of cache for both splits.
_PNG_COMPRESSION_LEVEL = 0

# IDX element type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte types are big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------------------------------
# IDX parsing and PNG encoding
# --------------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, by its ``.gz`` suffix) into a numpy array.

    The header is validated: two zero bytes, a known element type code, the number of dimensions,
    then one big-endian uint32 per dimension; the payload must have exactly the announced size.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise ValueError(f"{path} is not an IDX file (magic bytes {data[:4].hex() or 'missing'}).")
    type_code, num_dims = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}.")
    if num_dims == 0:
        raise ValueError(f"{path}: IDX header announces 0 dimensions.")
    header_size = 4 + 4 * num_dims
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated IDX header.")
    dims = struct.unpack(f">{num_dims}I", data[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_size != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {dims} ({expected} bytes) but the payload has "
            f"{len(data) - header_size} bytes."
        )
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(dims)


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(tag)))


def _encode_grey_pngs(images: np.ndarray, compression_level: int = _PNG_COMPRESSION_LEVEL) -> list[bytes]:
    """Encode a (N, H, W) uint8 stack as N 8-bit greyscale PNG files.

    A direct encoder (one IHDR, one IDAT, filter type 0 on every row) is twice as fast as PIL's
    ``Image.save`` per image, and lossless: PIL decodes it back to the same array in mode "L".
    """
    count, height, width = images.shape
    rows = np.zeros((count, height, width + 1), dtype=np.uint8)  # each scanline starts with filter 0
    rows[:, :, 1:] = images
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    tail = _png_chunk(b"IEND", b"")
    return [head + _png_chunk(b"IDAT", zlib.compress(row.tobytes(), compression_level)) + tail for row in rows]


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------
def fashion_mnist_features() -> datasets.Features:
    """The schema of the built-in data set (identical to the Hub's ``zalando-datasets/fashion_mnist``)."""
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASS_NAMES))}
    )


def hf_sparse_cache_dir() -> Path:
    """Root of hf_sparse's on-disk cache: ``$HF_SPARSE_CACHE``, else ``$XDG_CACHE_HOME/hf_sparse``
    (``~/.cache/hf_sparse``)."""
    if os.environ.get(_ENV_CACHE):
        return Path(os.environ[_ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "hf_sparse"


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get(_ENV_DATA_DIR) or DEFAULT_FASHION_MNIST_DIR).expanduser()


def _split_files(data_dir: Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) files of a split; accepts the gzip files or already-decompressed ones."""
    prefix = _SPLIT_FILE_PREFIX[split]
    found: list[Path] = []
    looked_for: list[Path] = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [data_dir / f"{prefix}-{kind}-ubyte.gz", data_dir / f"{prefix}-{kind}-ubyte"]
        looked_for.extend(candidates)
        existing = [candidate for candidate in candidates if candidate.is_file()]
        if existing:
            found.append(existing[0])
    if len(found) != 2:
        listing = "\n  ".join(str(path) for path in looked_for)
        raise FileNotFoundError(
            f"Fashion-MNIST {split!r} split not found in {data_dir}. Looked for:\n  {listing}\n"
            "Install Debian's package with `sudo apt-get install dataset-fashion-mnist` (files land in "
            f"{DEFAULT_FASHION_MNIST_DIR}), point `data_dir=` or ${_ENV_DATA_DIR} at a folder holding "
            f"the IDX files, or, when online, load the Hub data set {FASHION_MNIST_HUB_NAME!r} with "
            f"`load_image_classification_dataset({FASHION_MNIST_HUB_NAME!r}, split=...)`."
        )
    return found[0], found[1]


def _read_split(images_path: Path, labels_path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, {_IMAGE_SIZE}, {_IMAGE_SIZE}), "
            f"got {images.dtype} {images.shape}."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected a 1-d uint8 label vector, got {labels.dtype} {labels.shape}.")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels.")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASS_NAMES):
        raise ValueError(f"{labels_path}: label {int(labels.max())} is out of range for 10 classes.")
    if len(images) != _SPLIT_SIZES[split]:
        # Not an error (a user may point data_dir at a subset), but worth knowing.
        logger.warning("Fashion-MNIST %s split has %d examples (expected %d).", split, len(images), _SPLIT_SIZES[split])
    return images, labels


def _build_split(images_path: Path, labels_path: Path, split: str) -> datasets.Dataset:
    """Build the split as an in-memory Arrow table with the Image feature's storage layout.

    Measured on 60k images (2 CPU cores): PIL encode + ``Dataset.from_dict`` ~4.1 s; this direct PNG
    encoder + a pyarrow table in the ``Image`` storage type (struct<bytes, path>) ~0.5 s.
    """
    images, labels = _read_split(images_path, labels_path, split)
    features = fashion_mnist_features()
    image_storage = pa.StructArray.from_arrays(
        [pa.array(_encode_grey_pngs(images), type=pa.binary()), pa.nulls(len(images), type=pa.string())],
        names=["bytes", "path"],
    )
    table = pa.table({"image": image_storage, "label": pa.array(labels.astype(np.int64))})
    table = table.cast(features.arrow_schema)
    info = datasets.DatasetInfo(
        description="Fashion-MNIST (Zalando Research), read from local IDX files by hf_sparse.",
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        license="MIT",
        features=features,
    )
    return datasets.Dataset(table, info=info, split=datasets.NamedSplit(split))


def _cache_key(images_path: Path, labels_path: Path) -> str:
    """Identify the source files, so another data_dir or a changed file never reuses a stale cache."""
    parts: list[Any] = [_CACHE_FORMAT_VERSION]
    for path in (images_path, labels_path):
        stat = path.stat()
        parts.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _save_quietly(dataset: datasets.Dataset, path: Path) -> None:
    """``save_to_disk`` without its progress bar (a sub-second write), leaving the global setting as found."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        dataset.save_to_disk(str(path))
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _load_split(split: str, data_dir: Path, cache_dir: Path | None) -> datasets.Dataset:
    images_path, labels_path = _split_files(data_dir, split)
    if cache_dir is None:
        return _build_split(images_path, labels_path, split)
    target = cache_dir / "fashion_mnist" / _cache_key(images_path, labels_path) / split
    if target.is_dir():
        try:
            dataset = datasets.load_from_disk(str(target))
            if isinstance(dataset, datasets.Dataset) and dataset.features == fashion_mnist_features():
                return dataset
        except Exception as error:  # a half-deleted or foreign folder: rebuild it
            logger.warning("Ignoring unreadable Fashion-MNIST cache %s (%s).", target, error)
        shutil.rmtree(target, ignore_errors=True)
    dataset = _build_split(images_path, labels_path, split)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write to a private folder and rename it into place: concurrent processes (pytest-xdist
        # workers, accelerate ranks) never see a half-written cache; the loser discards its copy.
        staging = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=target.parent))
        _save_quietly(dataset, staging)
        try:
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
        return datasets.load_from_disk(str(target))
    except OSError as error:
        logger.warning("Could not cache Fashion-MNIST under %s (%s); using it from memory.", target, error)
        return dataset


def load_fashion_mnist(
    split: str | None = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> datasets.Dataset | datasets.DatasetDict:
    """Load Fashion-MNIST from local IDX files as ``datasets`` data.

    Args:
        split: ``"train"`` (60k), ``"test"`` (10k) or ``None`` for a ``DatasetDict`` with both.
        data_dir: folder of the ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` files; default
            ``$HF_SPARSE_FASHION_MNIST_DIR``, else Debian's ``/usr/share/datasets/fashion-mnist``.
        cache_dir: root of the Arrow cache; default :func:`hf_sparse_cache_dir` (``$HF_SPARSE_CACHE``
            or ``~/.cache/hf_sparse``). The data goes to ``<cache_dir>/fashion_mnist/<key>/<split>``.
        use_cache: ``False`` builds in memory and writes nothing.

    Returns:
        Features ``{"image": Image(), "label": ClassLabel(10 names)}``; images decode to 28x28 PIL
        images in mode "L".

    Raises:
        FileNotFoundError: the files are missing (the message says how to get them).
        ValueError: ``split`` is unknown or a file is not a valid Fashion-MNIST IDX file.
    """
    if split is not None and split not in _SPLIT_FILE_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILE_PREFIX)} or None, got {split!r}.")
    source = _resolve_data_dir(data_dir)
    cache_root = (
        (Path(cache_dir).expanduser() if cache_dir is not None else hf_sparse_cache_dir()) if use_cache else None
    )
    if split is not None:
        return _load_split(split, source, cache_root)
    return datasets.DatasetDict({name: _load_split(name, source, cache_root) for name in _SPLIT_FILE_PREFIX})


# --------------------------------------------------------------------------------------------------
# Any image classification data set
# --------------------------------------------------------------------------------------------------
_BUILTIN_NAMES = {"fashion_mnist", "fashion-mnist"}
_IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")


def _pick_column(
    features: datasets.Features,
    requested: str | None,
    feature_type: type,
    common_names: Sequence[str],
    role: str,
    argument: str,
) -> str:
    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise ValueError(f"{argument}={requested!r} is not a column; available columns: {columns}.")
        return requested
    typed = [name for name in columns if isinstance(features[name], feature_type)]
    # Several typed columns (CIFAR-100: fine_label and coarse_label): prefer the usual names.
    for name in common_names:
        if name in typed:
            return name
    if typed:
        return typed[0]
    for name in common_names:
        if name in features:
            return name
    raise ValueError(
        f"Cannot find the {role} column: no {feature_type.__name__} feature and none of the usual names "
        f"{list(common_names)}; available columns: {columns}. Set `{argument}` (`--{argument}` on the command "
        "line) to the column to use."
    )


def prepare_image_classification_columns(
    dataset: datasets.Dataset | datasets.DatasetDict,
    image_column: str | None = None,
    label_column: str | None = None,
) -> datasets.Dataset | datasets.DatasetDict:
    """Rename the image and label columns of ``dataset`` to ``"image"`` and ``"label"``.

    Columns are found by feature type (``Image``, ``ClassLabel``) first, then by the usual names
    (``image``/``img``/``pixel_values``, ``label``/``labels``/``fine_label``). A string label column
    is class-encoded into a ``ClassLabel``. Other columns are kept.
    """
    first = next(iter(dataset.values())) if isinstance(dataset, datasets.DatasetDict) else dataset
    features = first.features
    image_name = _pick_column(features, image_column, datasets.Image, _IMAGE_COLUMN_NAMES, "image", "image_column")
    label_name = _pick_column(features, label_column, datasets.ClassLabel, _LABEL_COLUMN_NAMES, "label", "label_column")
    if image_name == label_name:
        raise ValueError(f"image_column and label_column are both {image_name!r}; columns: {list(features)}.")
    renames = {old: new for old, new in ((image_name, "image"), (label_name, "label")) if old != new}
    clashes = [new for old, new in renames.items() if new in features and new not in renames]
    if clashes:
        raise ValueError(
            f"Cannot rename {list(renames)} to {list(renames.values())}: column(s) {clashes} already exist "
            f"with other content; available columns: {list(features)}. Drop or rename them first."
        )
    if renames:
        dataset = dataset.rename_columns(renames)
    label_feature = features[label_name]
    if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
        dataset = dataset.class_encode_column("label")
    return dataset


def load_image_classification_dataset(
    name_or_path: str,
    split: str | None = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset | datasets.DatasetDict:
    """Load an image classification data set with columns ``image`` and ``label``.

    Args:
        name_or_path: ``"fashion_mnist"`` for the built-in local data (:func:`load_fashion_mnist`),
            else anything ``datasets.load_dataset`` accepts: a Hub name (e.g.
            ``"zalando-datasets/fashion_mnist"``, needs network) or a local folder (``imagefolder``).
        split: split to load, or ``None`` for all splits (a ``DatasetDict``).
        image_column, label_column: source column names, when detection is not enough.
        **load_kwargs: passed to :func:`load_fashion_mnist` (``data_dir``, ``cache_dir``) or to
            ``datasets.load_dataset`` (``cache_dir``, ``revision``, ...).
    """
    if name_or_path in _BUILTIN_NAMES:
        dataset = load_fashion_mnist(split, **load_kwargs)
    else:
        dataset = datasets.load_dataset(name_or_path, split=split, **load_kwargs)
    if not isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        raise ValueError(f"{name_or_path!r} loaded as {type(dataset).__name__}; streaming data sets are not supported.")
    if image_column is None and os.path.isdir(name_or_path):
        _check_holds_images(name_or_path, dataset)
    return prepare_image_classification_columns(dataset, image_column, label_column)


def _check_holds_images(folder: str, dataset: datasets.Dataset | datasets.DatasetDict) -> None:
    """A local folder of anything but images (text, CSV, ...) is said to be one, not reported as a missing column."""
    first = next(iter(dataset.values())) if isinstance(dataset, datasets.DatasetDict) else dataset
    if not any(isinstance(feature, datasets.Image) for feature in first.features.values()):
        raise ValueError(
            f"folder {folder!r} holds no images (`datasets` read it as columns {list(first.features)}): an image "
            "folder has one sub-folder of images per class (e.g. cat/1.png, dog/1.png)."
        )
