"""The `hf-sparse` commands end to end on small slices: the demo (main job) and the benchmarks' plumbing.
Benchmarks print measurements; these tests check what they produce, never how fast it was."""

from __future__ import annotations

import json
import re
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
    assert "dense ViT" in printed and "Tri-Level SparseViT" in printed and "vs matched" in printed
    results = json.loads((output / "results.json").read_text())
    dense, matched, tri = results["runs"]
    assert [run["role"] for run in results["runs"]] == ["dense", "dense_budget_matched", "tri_level"]
    assert dense["images_trained"] == 512 and tri["images_trained"] == 512  # the default: token pruning alone
    assert "Tri-Level SparseViT (tokens 0.5)" in printed
    assert len(dense["curve"]) == 2 and len(tri["curve"]) == 2
    # the budget-matched run is its own, shorter run, its schedule fully decayed
    assert 0 < matched["steps"] < dense["steps"] and matched["final_learning_rate"] == pytest.approx(0.0, abs=1e-12)
    assert matched["steps"] == max(1, round(dense["steps"] * tri["train_seconds"] / dense["train_seconds"]))
    for name in ("accuracy_vs_wall_clock.png", "kept_patches.png"):
        with Image.open(output / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    final = output / "tri_level" / "final"
    assert (final / "model.safetensors").exists() and (final / "README.md").exists()
    assert (final / "preprocessor_config.json").exists()


@needs_fashion_mnist
def test_bench_e2e_measures_the_protocol_over_seeds(tmp_path, capsys):
    path = tmp_path / "e2e.json"
    command = [
        "bench", "e2e", "--output_dir", str(tmp_path), "--variants", "tokens_0.7", "--seeds", "1", "2",
        "--max_train_samples", "256", "--max_eval_samples", "128", "--epochs", "2", "--evaluations", "4",
        "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--json", str(path),
    ]
    cli_main(command)
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert [row["variant"] for row in rows] == ["dense", "tokens_0.7"]
    dense, tokens = rows
    assert dense["time_saved"] == 0.0 and all(0.0 <= row["test_accuracy"] <= 1.0 for row in rows)
    for key in ("budget_matched_dense_accuracy", "time_to_dense_accuracy_s", "test_accuracy", "train_seconds",
                "images_trained", "time_saved"):
        assert len(tokens[f"{key}_per_seed"]) == 2 and key in tokens
    runs = result["runs"]
    for seed in ("1", "2"):
        full, variant, matched = runs[seed]["dense"], runs[seed]["tokens_0.7"]["run"], runs[seed]["tokens_0.7"]["budget_matched"]
        assert matched["role"] == "dense_budget_matched" and matched["final_learning_rate"] == pytest.approx(0, abs=1e-12)
        assert matched["steps"] == max(1, round(full["steps"] * variant["train_seconds"] / full["train_seconds"]))
        # time to dense accuracy: the first evaluation of the run's own curve at or above dense's final - 0.3 points
        target = full["accuracy"] - 0.003
        reached = [point["train_seconds"] for point in variant["curve"] if point["accuracy"] >= target]
        assert tokens["time_to_dense_accuracy_s_per_seed"][int(seed) - 1] == (reached[0] if reached else None)
        assert len(full["curve"]) == 4
    # seeds are distinct runs: other initial weights, other curves
    assert runs["1"]["dense"]["curve"] != runs["2"]["dense"]["curve"]
    assert result["calibration"]["dense_steps_per_second"] > 0
    with Image.open(tmp_path / "accuracy_vs_wall_clock.png") as image:
        assert image.size[0] > 300
    # a rerun with one more seed keeps the finished seeds (same runs, not retrained) and trains only the new one
    cli_main([*command[:command.index("--seeds") + 1], "1", "2", "3", *command[command.index("--seeds") + 3:]])
    resumed = json.loads(path.read_text())
    assert resumed["runs"]["1"] == runs["1"] and resumed["runs"]["2"] == runs["2"] and "3" in resumed["runs"]
    assert len(resumed["rows"][1]["test_accuracy_per_seed"]) == 3
    # a JSON written with other settings is refused before any training, naming what differs
    with pytest.raises(SystemExit):
        cli_main([*command[:command.index("--epochs") + 1], "1", *command[command.index("--epochs") + 2:]])
    assert re.search(r"other settings.*arguments\.epochs", capsys.readouterr().err)
    assert json.loads(path.read_text()) == resumed


def test_bench_throughput_reports_ratios_against_hf_vit(tmp_path, capsys):
    path = tmp_path / "throughput.json"
    cli_main(["bench", "throughput", "--image_size", "16", "--patch_size", "2", "--batch_size", "2", "--rounds", "1",
              "--warmup", "0", "--json", str(path)])
    result = json.loads(path.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"hf_vit", "sparse_vit_off", "token_0.7", "token_0.7_attn_0.5"}
    assert rows["hf_vit"]["train_ratio"] == 1.0 and rows["sparse_vit_off"]["train_flops_ratio"] == 1.0
    assert all(len(row["train_ratios_per_round"]) == result["rounds"] for row in rows.values())
    assert rows["token_0.7"]["train_flops_ratio"] > 1.3
    assert "x HF ViT" in capsys.readouterr().out


def test_bench_throughput_measures_until_the_spread_is_small_enough():
    from hf_sparse.experiments.bench_throughput import run_throughput

    tiny = dict(image_size=8, patch_size=2, batch_size=2, rounds=2, warmup=0)
    assert run_throughput(**tiny, max_rounds=4, target_spread=0.0)["rounds"] == 4  # never small enough: the cap
    assert run_throughput(**tiny, max_rounds=4, target_spread=10.0)["rounds"] == 2  # at once small enough


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
