"""A real install: build the wheel from a copy of the sources, install it (not editable) into a folder of its own,
and save, train with checkpoints, convert and run `hf-sparse train` from that install, in a process that cannot see
the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = r'''
import os, sys, json
import hf_sparse
assert hf_sparse.__file__.startswith(sys.argv[1]), hf_sparse.__file__  # the installed wheel, not the sources
import datasets, numpy as np, torch
from PIL import Image
from hf_sparse import (SparseViTConfig, SparseViTForImageClassification, ToSTTrainer, ToSTTrainingArguments,
                       TriLevelTrainer, TriLevelTrainingArguments, save_for_hub)
from hf_sparse.data import build_image_transforms, image_processor_for
from hf_sparse.cli import main as cli_main

torch.manual_seed(0)
model = SparseViTForImageClassification(SparseViTConfig(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=2,
    num_channels=1, num_labels=2, token_pruning_layers=[0, 1], token_keep_ratio=0.5))
save_for_hub(model, "saved", image_processor=image_processor_for(8, 1, (0.5,), (0.5,)))
assert {"README.md", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir("saved"))

rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 255, (8, 8)).astype(np.uint8), mode="L") for _ in range(16)]
data = datasets.Dataset.from_dict(
    {"image": images, "label": [i % 2 for i in range(16)]},
    features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
).with_transform(build_image_transforms(8, 1, (0.5,), (0.5,), train=True))
common = dict(max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=1, report_to=[],
              use_cpu=True, disable_tqdm=True)
TriLevelTrainer(model=model, args=TriLevelTrainingArguments(output_dir="tri", **common), train_dataset=data).train()
for name in ("trainer_state.json", "README.md", "model.safetensors", "example_pruning.safetensors"):
    assert os.path.isfile(os.path.join("tri", "checkpoint-1", name)), name
tost = SparseViTForImageClassification(SparseViTConfig(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=2,
    num_channels=1, num_labels=2))
ToSTTrainer(model=tost, args=ToSTTrainingArguments(output_dir="tost", mask_method="magnitude", rescaled_init="density",
                                                   **common), train_dataset=data).train()
assert os.path.isfile(os.path.join("tost", "checkpoint-2", "sparsity_masks.safetensors"))
assert "tost" in open(os.path.join("tost", "checkpoint-2", "README.md")).read()

# `hf-sparse train` from the wheel (recipes/ is not in it), here with flags alone, on an image folder
for index, image in enumerate(images):
    os.makedirs(os.path.join("folder", "ab"[index % 2]), exist_ok=True)
    image.save(os.path.join("folder", "ab"[index % 2], f"{index}.png"))
assert cli_main(["train", "tri-level", "--dataset_name", "folder", "--num_channels", "1", "--hidden_size", "16",
                 "--num_hidden_layers", "2", "--num_attention_heads", "2", "--patch_size", "2", "--max_steps", "1",
                 "--per_device_train_batch_size", "4", "--output_dir", "trained", "--report_to", "none",
                 "--save_strategy", "no", "--disable_tqdm", "true", "--token_keep_ratio", "0.5"]) == 0
assert json.load(open(os.path.join("trained", "config.json")))["token_keep_ratio"] == 0.5
print("installed wheel works")
'''


def test_the_wheel_ships_what_the_package_reads_and_a_plain_install_saves_and_trains(tmp_path):
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("hf_sparse", "model_cards"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)], capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("hf_sparse-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hf_sparse/model_cards/model_card.md", "hf_sparse/metrics/accuracy.py", "hf_sparse/py.typed",
            "hf_sparse/experiments/train.py"} <= names  # `hf-sparse train` and `accelerate launch -m` need no recipes/
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "hf-sparse = hf_sparse.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(target)], capture_output=True, text=True, timeout=600,
                         cwd=work, env=environment)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "installed wheel works" in run.stdout
