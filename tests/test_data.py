"""Built-in data (Fashion-MNIST from IDX files), generic loading and the image transforms."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_sparse.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASS_NAMES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    build_image_transforms,
    image_processor_for,
    load_fashion_mnist,
    load_image_classification_dataset,
    prepare_image_classification_columns,
    read_idx,
)
from hf_sparse.data import fashion_mnist as fashion_mnist_module

REAL_DATA = Path(DEFAULT_FASHION_MNIST_DIR)
needs_real_data = pytest.mark.skipif(
    not (REAL_DATA / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist",
)


def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture
def tiny_idx_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped folder with 30 train and 10 test images (train stored uncompressed)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    for prefix, count, compress in (("train", 30, False), ("t10k", 10, True)):
        suffix = ".gz" if compress else ""
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (count, 28, 28)), compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(count) % 10, compress)
    return folder


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_sparse_cache")


# ---- IDX and PNG -------------------------------------------------------------------------------
def test_read_idx_parses_and_validates(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    _write_idx(tmp_path / "a", array, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    (tmp_path / "bad_magic").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad_magic")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "short")
    (tmp_path / "type").write_bytes(bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="element type"):
        read_idx(tmp_path / "type")


def test_png_encoder_is_lossless():
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    for png, image in zip(fashion_mnist_module._encode_grey_pngs(images), images, strict=True):
        decoded = Image.open(__import__("io").BytesIO(png))
        assert decoded.format == "PNG" and decoded.mode == "L" and decoded.size == (28, 28)
        assert np.array_equal(np.asarray(decoded), image)


# ---- Fashion-MNIST -------------------------------------------------------------------------------
@needs_real_data
def test_fashion_mnist_train_and_test(real_cache):
    splits = load_fashion_mnist(None, cache_dir=real_cache)
    assert isinstance(splits, datasets.DatasetDict) and set(splits) == {"train", "test"}
    train, test = splits["train"], splits["test"]
    assert (train.num_rows, test.num_rows) == (60_000, 10_000)
    label_feature = train.features["label"]
    assert isinstance(label_feature, datasets.ClassLabel) and label_feature.names == list(FASHION_MNIST_CLASS_NAMES)
    assert isinstance(train.features["image"], datasets.Image)
    assert np.bincount(np.asarray(train["label"])).tolist() == [6000] * 10
    assert np.bincount(np.asarray(test["label"])).tolist() == [1000] * 10
    raw = read_idx(REAL_DATA / "t10k-images-idx3-ubyte.gz")
    for index in (0, 4321, 9999):
        image = test[index]["image"]
        assert image.size == (28, 28) and image.mode == "L"
        assert np.array_equal(np.asarray(image), raw[index])


@needs_real_data
def test_fashion_mnist_mean_and_std_constants():
    pixels = read_idx(REAL_DATA / "train-images-idx3-ubyte.gz").astype(np.float64) / 255.0
    assert round(float(pixels.mean()), 4) == FASHION_MNIST_MEAN[0]
    assert round(float(pixels.std()), 4) == FASHION_MNIST_STD[0]


def test_cache_is_written_once_and_reloaded(tiny_idx_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_SPARSE_CACHE", str(cache))
    first = load_fashion_mnist("train", data_dir=tiny_idx_dir)
    assert first.num_rows == 30
    assert all(Path(entry["filename"]).is_relative_to(cache / "fashion_mnist") for entry in first.cache_files)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached split should have been reused")

    monkeypatch.setattr(fashion_mnist_module, "_build_split", no_rebuild)
    again = load_fashion_mnist("train", data_dir=tiny_idx_dir)
    assert again.cache_files == first.cache_files
    assert np.array_equal(np.asarray(again[3]["image"]), np.asarray(first[3]["image"]))
    assert again["label"] == first["label"]


def test_use_cache_false_and_env_data_dir(tiny_idx_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_SPARSE_FASHION_MNIST_DIR", str(tiny_idx_dir))
    monkeypatch.setenv("HF_SPARSE_CACHE", str(tmp_path / "unused"))
    with caplog.at_level(logging.WARNING):
        test = load_fashion_mnist("test", use_cache=False)
    assert test.num_rows == 10 and test["label"] == list(range(10))
    assert "expected 10000" in caplog.text  # a subset is allowed but reported
    assert not (tmp_path / "unused").exists()


def test_missing_files_error_explains_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_fashion_mnist("train", data_dir=tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "zalando-datasets/fashion_mnist" in message
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", data_dir=tmp_path)


def test_corrupt_label_file_is_rejected(tiny_idx_dir):
    _write_idx(tiny_idx_dir / "t10k-labels-idx1-ubyte.gz", np.full(10, 12))
    with pytest.raises(ValueError, match="out of range"):
        load_fashion_mnist("test", data_dir=tiny_idx_dir, use_cache=False)


# ---- generic loading -----------------------------------------------------------------------------
def test_load_builtin_by_name(tiny_idx_dir):
    dataset = load_image_classification_dataset("fashion_mnist", "test", data_dir=tiny_idx_dir, use_cache=False)
    assert dataset.column_names == ["image", "label"] and dataset.num_rows == 10


def test_load_local_imagefolder(tmp_path):
    for class_name in ("cat", "dog"):
        (tmp_path / "images" / "train" / class_name).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), (index * 60, 0, 0)).save(
                tmp_path / "images" / "train" / class_name / f"{index}.png"
            )
    dataset = load_image_classification_dataset(str(tmp_path / "images"), "train", cache_dir=str(tmp_path / "hf"))
    assert set(dataset.column_names) == {"image", "label"} and dataset.num_rows == 4
    assert dataset.features["label"].names == ["cat", "dog"]


def test_column_detection_and_renaming():
    images = [Image.new("L", (4, 4), value) for value in (0, 100, 200)]
    cifar100_like = datasets.Dataset.from_dict(
        {"img": images, "coarse_label": [0, 1, 0], "fine_label": [2, 0, 1]},
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "coarse_label": datasets.ClassLabel(names=["a", "b"]),
                "fine_label": datasets.ClassLabel(names=["x", "y", "z"]),
            }
        ),
    )
    renamed = prepare_image_classification_columns(cifar100_like)
    assert renamed.column_names == ["image", "coarse_label", "label"] and renamed["label"] == [2, 0, 1]

    named_only = datasets.Dataset.from_dict({"pixel_values": images, "labels": ["shoe", "bag", "shoe"]})
    renamed = prepare_image_classification_columns(datasets.DatasetDict({"train": named_only}))["train"]
    assert isinstance(renamed.features["label"], datasets.ClassLabel)  # strings are class-encoded
    assert renamed.features["label"].names == ["bag", "shoe"]

    explicit = prepare_image_classification_columns(cifar100_like, label_column="coarse_label")
    assert explicit["label"] == [0, 1, 0]

    unknown = datasets.Dataset.from_dict({"photo_bytes": [b"x"], "category": [1]})
    with pytest.raises(ValueError, match="photo_bytes") as error:
        prepare_image_classification_columns(unknown)
    assert "category" in str(error.value)
    with pytest.raises(ValueError, match="label_column='nope'"):
        prepare_image_classification_columns(cifar100_like, label_column="nope")


# ---- transforms ----------------------------------------------------------------------------------
def _grey_batch(values=(0, 51, 255), size: int = 28) -> dict:
    return {"image": [Image.new("L", (size, size), value) for value in values], "label": list(range(len(values)))}


def test_eval_transform_shapes_dtypes_and_normalisation():
    transform = build_image_transforms(28, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD, train=False)
    output = transform(_grey_batch())
    assert set(output) == {"pixel_values", "labels"}
    assert output["pixel_values"].shape == (3, 1, 28, 28) and output["pixel_values"].dtype == torch.float32
    assert output["labels"].dtype == torch.long and output["labels"].tolist() == [0, 1, 2]
    for row, value in enumerate((0, 51, 255)):
        expected = (value / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
        assert torch.allclose(output["pixel_values"][row], torch.tensor(expected), atol=1e-6)
    # No label (inference): only pixel values.
    assert set(transform({"image": _grey_batch()["image"]})) == {"pixel_values"}


def test_transform_resizes_and_converts_channels():
    transform = build_image_transforms(32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)
    output = transform({"image": [Image.new("L", (28, 28), 255), Image.new("RGBA", (40, 20))], "label": [1, 0]})
    assert output["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.allclose(output["pixel_values"][0], torch.ones(3, 32, 32))
    with pytest.raises(ValueError, match="num_channels"):
        build_image_transforms(32, 2, (0.5,), (0.5,), train=False)
    with pytest.raises(ValueError, match="mean"):
        build_image_transforms(32, 3, (0.5, 0.5), (0.5,), train=False)


def test_train_augmentation_crop_and_flip_follow_torch_seed():
    base = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    batch = {"image": [Image.fromarray(base)] * 16, "label": [0] * 16}
    transform = build_image_transforms(28, 1, (0.0,), (1.0,), train=True, random_crop_padding=4, horizontal_flip=True)
    torch.manual_seed(0)
    first = transform(batch)["pixel_values"]
    torch.manual_seed(0)
    assert torch.equal(transform(batch)["pixel_values"], first)  # follows the Trainer seed
    padded = np.pad(base, 4).astype(np.float32) / 255.0
    windows = {(top, left, flipped) for top in range(9) for left in range(9) for flipped in (False, True)}
    seen = set()
    for image in first[:, 0].numpy():
        match = [
            (top, left, flipped)
            for top, left, flipped in windows
            if np.allclose(image, (padded[:, ::-1] if flipped else padded)[top : top + 28, left : left + 28])
        ]
        assert match, "every output is a (possibly flipped) 28x28 window of the zero-padded image"
        seen.add(match[0])
    assert len(seen) > 1 and any(flipped for _, _, flipped in seen)
    # Evaluation never augments, whatever the augmentation arguments say.
    evaluation = build_image_transforms(28, 1, (0.0,), (1.0,), train=False, random_crop_padding=4, horizontal_flip=True)
    assert np.allclose(evaluation(batch)["pixel_values"][0, 0].numpy(), base / 255.0)


def test_with_transform_on_a_dataset_slice(tiny_idx_dir):
    dataset = load_fashion_mnist("train", data_dir=tiny_idx_dir, use_cache=False).select(range(8))
    transformed = dataset.with_transform(
        build_image_transforms(28, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD, train=True, random_crop_padding=2)
    )
    item = transformed[0]
    assert item["pixel_values"].shape == (1, 28, 28) and int(item["labels"]) == 0
    batch = transformed[2:6]
    assert batch["pixel_values"].shape == (4, 1, 28, 28) and batch["labels"].tolist() == [2, 3, 4, 5]
    loader = torch.utils.data.DataLoader(transformed, batch_size=4)
    assert next(iter(loader))["pixel_values"].shape == (4, 1, 28, 28)


@pytest.mark.parametrize(
    ("num_channels", "mean", "std", "images"),
    [
        (1, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "grey"),
        (3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "colour"),
    ],
)
def test_image_processor_matches_eval_transform(num_channels, mean, std, images, tmp_path):
    from transformers import AutoImageProcessor, ViTImageProcessorPil

    rng = np.random.default_rng(0)
    if images == "grey":  # same size, plus one needing a resize
        inputs = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(3)]
        inputs.append(Image.fromarray(rng.integers(0, 256, (40, 33), dtype=np.uint8)))
    else:  # RGB, greyscale and RGBA inputs, some resized
        inputs = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))]
        inputs.append(Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)))
        inputs.append(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    processor = image_processor_for(28, num_channels, mean, std)
    assert isinstance(processor, ViTImageProcessorPil)
    expected = build_image_transforms(28, num_channels, mean, std, train=False)({"image": inputs})["pixel_values"]
    actual = model_view(processor(inputs, return_tensors="pt")["pixel_values"], num_channels)
    assert actual.shape == expected.shape == (len(inputs), num_channels, 28, 28)
    # Same-size inputs match exactly; resized ones within PIL's uint8 rounding (resize before or after "L").
    assert torch.allclose(actual[:3], expected[:3], atol=1e-5)
    assert torch.allclose(actual, expected, atol=2 / 255 / min(std))
    # Saved next to a model, it reloads without torchvision and gives the same numbers.
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    reloaded_view = model_view(reloaded(inputs, return_tensors="pt")["pixel_values"], num_channels)
    assert torch.allclose(reloaded_view, actual, atol=1e-6)


def model_view(pixel_values: torch.Tensor, num_channels: int) -> torch.Tensor:
    """What SparseViT feeds its patch embedding: a 1-channel model takes the luma of 3-channel inputs."""
    if num_channels == 1 and pixel_values.shape[1] == 3:
        from hf_sparse.models.sparse_vit.modeling_sparse_vit import LUMA_WEIGHTS

        return (pixel_values * torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return pixel_values


@pytest.mark.parametrize("num_channels", [1, 3])
def test_pipeline_uses_the_saved_image_processor(num_channels, tmp_path):
    from transformers import pipeline

    from hf_sparse import SparseViTConfig, SparseViTForImageClassification

    torch.manual_seed(0)
    mean, std = FASHION_MNIST_MEAN * num_channels, FASHION_MNIST_STD * num_channels
    config = SparseViTConfig(
        image_size=28, patch_size=7, num_channels=num_channels, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=10,
        id2label=dict(enumerate(FASHION_MNIST_CLASS_NAMES)),
        label2id={name: index for index, name in enumerate(FASHION_MNIST_CLASS_NAMES)},
    )  # fmt: skip
    model = SparseViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    image_processor_for(28, num_channels, mean, std).save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    predictions = classifier(image, top_k=10)  # a plain greyscale PIL image, whatever the model's channels
    expected_pixels = build_image_transforms(28, num_channels, mean, std, train=False)({"image": [image]})["pixel_values"]
    with torch.no_grad():
        expected = model(expected_pixels).logits.softmax(-1)[0]
    scores = {p["label"]: p["score"] for p in predictions}
    for index, name in enumerate(FASHION_MNIST_CLASS_NAMES):
        assert scores[name] == pytest.approx(expected[index].item(), abs=1e-5)