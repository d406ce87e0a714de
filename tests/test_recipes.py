"""The recipes (`hf-sparse train METHOD CONFIG --overrides`, the thin `recipes/<method>.py` scripts over it and
`accelerate launch -m hf_sparse.experiments.train`) and `hf-sparse bench tost`, end to end on small slices of the
built-in data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sparse.cli import main as cli_main
from hf_sparse.data import DEFAULT_FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--max_train_samples", "64", "--max_eval_samples", "32", "--num_train_epochs", "1", "--hidden_size", "32",
         "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "64",
         "--per_device_train_batch_size", "16", "--disable_tqdm", "true"]

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist",
)


BIN = Path(sys.executable).parent
# The three ways in, one per case: the repository's thin script, the installed command, `accelerate launch -m`.
ENTRY_POINTS = {
    "script": lambda method: [sys.executable, str(ROOT / "recipes" / f"{method.replace('-', '_')}.py")],
    "command": lambda method: [str(BIN / "hf-sparse"), "train", method],
    "accelerate": lambda method: [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
                                  "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                                  "hf_sparse.experiments.train", method],
}


@pytest.mark.parametrize(
    "entry_point,method,config,state_file,model_type",
    [
        ("accelerate", "tri-level", "tri_level_fashion_mnist.yaml", "example_pruning.safetensors", "sparse_vit"),
        ("command", "tri-level", "tri_level_fashion_mnist_converged.yaml", "example_pruning.safetensors", "sparse_vit"),
        ("script", "tost", "tost_fashion_mnist.yaml", "sparsity_masks.safetensors", "sparse_vit"),
        ("command", "tost", "tost_resnet_fashion_mnist.yaml", "sparsity_masks.safetensors", "resnet"),
    ],
)
def test_recipe_runs_from_its_yaml_config_with_overrides(tmp_path, entry_point, method, config, state_file, model_type):
    output = tmp_path / "run"
    command = [*ENTRY_POINTS[entry_point](method), str(ROOT / "recipes" / "configs" / config),
               *SMALL, "--resnet_hidden_sizes", "8", "16", "--resnet_depths", "1", "1", "--output_dir", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert completed.returncode == 0, completed.stderr[-4000:]
    metrics = json.loads((output / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (output / "model.safetensors").exists() and (output / state_file).exists()
    assert (output / "README.md").exists() and (output / "preprocessor_config.json").exists()
    saved = json.loads((output / "config.json").read_text())
    assert saved["model_type"] == model_type
    if model_type == "resnet":
        assert saved["hidden_sizes"] == [8, 16] and "auto_map" not in saved  # a plain transformers checkpoint
    else:
        assert saved["hidden_size"] == 32  # the overrides won over the YAML


def test_bench_tost_writes_vanilla_and_recipe_rows_and_merges_other_runs(tmp_path, capsys, monkeypatch):
    command = ["bench", "tost", "--methods", "magnitude", "--sparsities", "0.5", "--techniques", "vanilla", "full",
               "ghost_skips+label_smoothing",
               "--seeds", "42", "--max_train_samples", "64", "--max_eval_samples", "32", "--epochs", "1",
               "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
               "--resnet_hidden_sizes", "8", "16", "--resnet_depths", "1", "1", "--output_dir", str(tmp_path)]
    cli_main(command)
    rows = json.loads((tmp_path / "bench_tost.json").read_text())["rows"]
    # the ResNet's recipe is vanilla sparse training: its "full" rows would repeat the vanilla ones
    assert {(row["family"], row["method"], row["technique"]) for row in rows} == {
        ("resnet", "magnitude", "vanilla"), ("resnet", "magnitude", "ghost_skips+label_smoothing"),
        *(("sparse_vit", "magnitude", technique) for technique in ("vanilla", "full", "ghost_skips+label_smoothing"))}
    assert all(abs(row["mask_sparsity"] - 0.5) <= 0.005 for row in rows)
    # every run records the gradient reaching its kept weights over its first steps
    assert all(row["masked_gradient_norm"] > 0 for row in rows)
    out = capsys.readouterr().out
    assert "vs vanilla" in out and "grad flow" in out
    assert "resnet: the family's recipe is vanilla sparse training" in out
    for family in ("resnet", "sparse_vit"):  # the paired deltas, a plot per family
        assert (tmp_path / f"paired_deltas_{family}.png").stat().st_size > 0

    # another seed run on its own (as side by side) merges into the first JSON; nothing is trained again
    small = command[command.index("--max_train_samples"):]
    other = tmp_path / "seed43.json"
    cli_main(["bench", "tost", "--methods", "magnitude", "--sparsities", "0.5", "--techniques", "vanilla",
              "--seeds", "43", *small, "--json", str(other)])
    capsys.readouterr()

    def broken_plot(*args, **kwargs):
        raise RuntimeError("no backend")

    # a plot that fails is a warning; the merged results are written all the same
    monkeypatch.setattr("hf_sparse.experiments.bench_tost.plot_paired_deltas", broken_plot)
    cli_main(["bench", "tost", "--methods", "magnitude", "--sparsities", "0.5", "--techniques", "vanilla", "full",
              "--seeds", "42", *small, "--merge", str(other)])
    out = capsys.readouterr().out
    assert "warning: the plot" in out and "no backend" in out
    assert "===" not in out  # every row of the grid came from the two JSONs
    merged = json.loads((tmp_path / "bench_tost.json").read_text())
    assert len(merged["rows"]) == len(rows) + 2
    assert {(row["family"], row["seed"]) for row in merged["rows"] if row["technique"] == "vanilla"} == {
        (family, seed) for family in ("resnet", "sparse_vit") for seed in (42, 43)}
    assert {key.rsplit("/", 1)[1] for key in merged["mask_seconds"]} == {"42", "43"}
    vanilla = [row for row in merged["table"] if row["technique"] == "vanilla"]
    assert all(row["seeds"] == [42, 43] for row in vanilla)
    # a JSON written with other settings is refused, naming what differs
    held = json.loads(other.read_text())
    held["settings"]["batch_size"] = 64
    other.write_text(json.dumps(held))
    with pytest.raises(SystemExit):
        cli_main(["bench", "tost", "--methods", "magnitude", "--sparsities", "0.5", "--seeds", "42", *small,
                  "--merge", str(other)])
    assert "differ in batch_size" in capsys.readouterr().err


def test_bench_tost_combines_single_techniques_and_refuses_bad_names(monkeypatch):
    from hf_sparse.experiments.bench_tost import ToSTBenchArguments, plan_grid
    from hf_sparse.experiments.tost_grid import FAMILIES, VANILLA, technique_arguments
    from hf_sparse.tost.arguments import FAMILY_RECIPES

    resnet = FAMILIES["resnet"]
    # each part switches on its own technique at the value it has alone; the rest stays vanilla
    assert technique_arguments("ghost_skips+label_smoothing", resnet) == {
        **VANILLA, "ghost_skip_connections": True, "label_smoothing": 0.1}
    assert technique_arguments("ghost_neurons+density_init", resnet) == {
        **VANILLA, "ghost_soft_neurons": True, "rescaled_init": "density"}
    assert technique_arguments("paper", resnet) == {"ghost_soft_neurons": True, "ghost_skip_connections": True,
                                                    "rescaled_init": "gradinit", "label_smoothing": 0.1}
    # "field=value" parts set a technique's setting: smoothing on at 0.2, or the ghost skips at alpha 0.5
    assert technique_arguments("label_smoothing=0.2", resnet) == {**VANILLA, "label_smoothing": 0.2}
    assert technique_arguments("ghost_skips+label_smoothing+ghost_skip_alpha=0.5", resnet) == {
        **VANILLA, "ghost_skip_connections": True, "label_smoothing": 0.1, "ghost_skip_alpha": 0.5}
    # a variant that repeats another is not trained twice: the CNN recipe is vanilla, so its "full" is the vanilla
    # runs; a variant that is a family's recipe itself is its "full"
    grid = plan_grid(ToSTBenchArguments(families=["resnet", "sparse_vit"], methods=["random"], sparsities=[0.9],
                                        seeds=[42], techniques=["full", "label_smoothing", "ghost_skips"]))
    assert [(family, technique) for family, _, _, technique, _ in grid] == [
        ("resnet", "vanilla"), ("resnet", "label_smoothing"), ("resnet", "ghost_skips"),
        ("sparse_vit", "vanilla"), ("sparse_vit", "full"), ("sparse_vit", "label_smoothing"),
        ("sparse_vit", "ghost_skips")]
    with monkeypatch.context() as patch:  # a variant equal to the family's recipe runs as "full" only
        patch.setitem(FAMILY_RECIPES, "cnn", {**FAMILY_RECIPES["cnn"], "label_smoothing": 0.1})
        grid = plan_grid(ToSTBenchArguments(families=["resnet"], methods=["random"], sparsities=[0.9], seeds=[42],
                                            techniques=["full", "label_smoothing", "ghost_skips"]))
        assert [technique for _, _, _, technique, _ in grid] == ["vanilla", "full", "ghost_skips"]
    for bad, message in [("ghost_skips+ghost_skips", "distinct"), ("full+ghost_skips", "neither"),
                         ("gradinit+density_init", "one rescaled"), ("skips", "neither"),
                         ("label_smoothing+label_smoothing=0.2", "distinct"), ("ghost_end_fraction=0", r"\(0, 1\]"),
                         ("sparsity=0.5", "settable: \\['label_smoothing'"), ("label_smoothing=high", "float")]:
        with pytest.raises(ValueError, match=message):
            ToSTBenchArguments(techniques=[bad])


def test_bench_tost_gradient_flow_grid_stops_after_its_steps_and_reuses_the_masks(tmp_path, capsys):
    small = ["--families", "resnet", "--methods", "magnitude", "--sparsities", "0.5", "--seeds", "42",
             "--max_train_samples", "64", "--max_eval_samples", "32", "--epochs", "2", "--batch_size", "16",
             "--resnet_hidden_sizes", "8",
             "16", "--resnet_depths", "1", "1", "--output_dir", str(tmp_path)]
    cli_main(["bench", "tost", *small, "--techniques", "label_smoothing", "--gradient_flow_steps", "2"])
    cli_main(["bench", "tost", *small, "--techniques", "label_smoothing", "--gradient_flow_only",
              "--gradient_flow_steps", "2", "--json", str(tmp_path / "flow.json")])
    out = capsys.readouterr().out
    flow = json.loads((tmp_path / "flow.json").read_text())
    assert flow["settings"]["gradient_flow_only"] == {"steps": 2}
    full = json.loads((tmp_path / "bench_tost.json").read_text())
    assert [row["optimizer_steps"] for row in full["rows"]] == [8, 8]
    assert [row["optimizer_steps"] for row in flow["rows"]] == [2, 2]
    # its steps are the full runs' first steps: the same gradients
    assert [row["masked_gradient_norm"] for row in flow["rows"]] == pytest.approx(
        [row["masked_gradient_norm"] for row in full["rows"]], rel=1e-5)
    (smoothing,) = [row for row in flow["table"] if row["technique"] == "label_smoothing"]
    assert smoothing["gradient_flow_ratio"] > 0 and "x" in out.split("grad flow")[-1]
    assert "the accuracies are after 2 steps" in out  # and no plot of their deltas
    assert [path.name for path in tmp_path.glob("*.png")] == ["paired_deltas_resnet.png"]  # the full runs' only
    # the diagnostic trained on the full runs' masks: one masks folder, its mask computed once
    assert len(list((tmp_path / "masks").iterdir())) == 1
    assert "mask_seconds" in flow and not flow["mask_seconds"]
