"""The `hf-sparse` commands end to end on small slices: the demo (main job) and the benchmarks' plumbing.
Benchmarks print measurements; these tests check what they produce, never how fast it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from hf_sparse.cli import main as cli_main
from hf_sparse.data import DEFAULT_FASHION_MNIST_DIR

needs_fashion_mnist = pytest.mark.skipif(
    not (Path(DEFAULT_FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist",
)


@needs_fashion_mnist
def test_demo_trains_both_models_and_writes_the_table_plots_and_model(tmp_path, capsys):
    output = tmp_path / "demo"
    assert cli_main([
        "demo", "--output_dir", str(output), "--max_train_samples", "512", "--max_eval_samples", "256",
        "--epochs", "1", "--evaluations", "2", "--batch_size", "64", "--hidden_size", "32",
        "--num_hidden_layers", "2", "--num_attention_heads", "2",
    ]) == 0
    printed = capsys.readouterr().out
    assert "dense ViT" in printed and "Tri-Level SparseViT" in printed and "time saved" in printed
    results = json.loads((output / "results.json").read_text())
    dense, tri = results["runs"]
    assert dense["images_trained"] == 512 and tri["images_trained"] == 512 - round(0.2 * 512)
    assert len(dense["curve"]) == 2 and len(tri["curve"]) == 2
    for name in ("accuracy_vs_wall_clock.png", "kept_patches.png"):
        with Image.open(output / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    final = output / "tri_level" / "final"
    assert (final / "model.safetensors").exists() and (final / "README.md").exists()
    assert (final / "preprocessor_config.json").exists()


@needs_fashion_mnist
def test_bench_e2e_writes_a_row_per_variant(tmp_path):
    path = tmp_path / "e2e.json"
    cli_main([
        "bench", "e2e", "--output_dir", str(tmp_path), "--variants", "dense", "tokens_only", "--max_train_samples", "256",
        "--max_eval_samples", "128", "--epochs", "1", "--hidden_size", "32", "--num_hidden_layers", "2",
        "--num_attention_heads", "2", "--json", str(path),
    ])
    rows = json.loads(path.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["dense", "tokens_only"]
    assert rows[0]["time_saved"] == 0.0 and all(0.0 <= row["test_accuracy"] <= 1.0 for row in rows)


def test_bench_throughput_reports_ratios_against_hf_vit(tmp_path, capsys):
    path = tmp_path / "throughput.json"
    cli_main(["bench", "throughput", "--image_size", "16", "--patch_size", "2", "--batch_size", "2", "--rounds", "1",
              "--warmup", "0", "--json", str(path)])
    result = json.loads(path.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"hf_vit", "sparse_vit_off", "token_0.7", "token_0.7_attn_0.5"}
    assert rows["hf_vit"]["train_ratio"] == 1.0 and rows["sparse_vit_off"]["train_flops_ratio"] == 1.0
    assert rows["token_0.7"]["train_flops_ratio"] > 1.3
    assert "x HF ViT" in capsys.readouterr().out


def test_convert_command_writes_a_sparse_vit_folder(tmp_path):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from hf_sparse import SparseViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=32, image_size=8, patch_size=4))
    vit.save_pretrained(tmp_path / "vit")
    assert cli_main(["convert", str(tmp_path / "vit"), str(tmp_path / "sparse"), "--token_keep_ratio", "0.5"]) == 0
    model = SparseViTForImageClassification.from_pretrained(tmp_path / "sparse")
    assert model.config.token_keep_ratio == 0.5
