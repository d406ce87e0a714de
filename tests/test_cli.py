"""The `hf-sparse` commands end to end on small slices: the demo (main job) and the benchmarks' plumbing.
Benchmarks print measurements; these tests check what they produce, never how fast it was."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

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
    dense, matched, tri, patch_dropout = results["runs"]
    assert [run["role"] for run in results["runs"]] == ["dense", "dense_budget_matched", "tri_level", "patch_dropout"]
    assert dense["images_trained"] == 512 and tri["images_trained"] == 512  # the default: token pruning alone
    assert "Tri-Level SparseViT (tokens 0.5)" in printed and "PatchDropout" in printed
    assert len(dense["curve"]) == 2 and len(tri["curve"]) == 2
    # the random-dropping alternative: PatchDropout at the Tri-Level run's training FLOPs, both models evaluated
    # pruned (CLS attention at 0.5) and with all tokens; the Tri-Level model as configured is the pruned one
    assert 0.0 < patch_dropout["patch_dropout_keep_ratio"] < 1.0 and patch_dropout["images_trained"] == 512
    assert tri["pruned_accuracy"] == tri["accuracy"] and patch_dropout["all_tokens_accuracy"] == patch_dropout["accuracy"]
    for run in (tri, patch_dropout):
        assert 0.0 <= run["pruned_accuracy"] <= 1.0 and 0.0 <= run["all_tokens_accuracy"] <= 1.0
    # the budget-matched run is its own run, its schedule fully decayed, as many steps as dense takes in the Tri-Level
    # run's measured seconds (the formula, not which run was faster: that depends on the machine's load)
    assert matched["final_learning_rate"] == pytest.approx(0.0, abs=1e-12)
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
        assert len(full["curve"]) == 4 and len(variant["curve"]) == 4
        assert len(matched["curve"]) == 1 and matched["curve"][0]["step"] == matched["steps"]  # only its final accuracy
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


@needs_fashion_mnist
def test_bench_e2e_token_arms_report_pruned_and_all_tokens_accuracy(tmp_path, capsys):
    """The random alternatives (issue 18): random selection and FLOPs-matched PatchDropout beside CLS-attention
    pruning, each evaluated pruned and with all tokens; results written before those columns still read."""
    from hf_sparse.experiments.bench_e2e import E2EArguments, finished_seeds, format_table, summarize
    from hf_sparse.experiments.common import ModelArguments
    from hf_sparse.flops import matched_patch_dropout_keep_ratio
    from hf_sparse.models.sparse_vit import SparseViTConfig
    from hf_sparse.tri_level.schedule import KeepRatioSchedule

    path = tmp_path / "e2e.json"
    arms = ["tokens_0.5", "random_tokens_0.5", "patch_dropout_0.5"]
    cli_main(["bench", "e2e", "--output_dir", str(tmp_path), "--variants", *arms, "--seeds", "3",
              "--max_train_samples", "128", "--max_eval_samples", "64", "--epochs", "1", "--evaluations", "2",
              "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--json", str(path)])
    assert "all tokens %" in capsys.readouterr().out
    result = json.loads(path.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["dense", *arms]
    assert rows["dense"]["pruned_accuracy"] is None and rows["dense"]["all_tokens_accuracy_per_seed"] == [None]
    for arm in arms:
        row, runs = rows[arm], result["runs"]["3"][arm]
        assert 0.0 <= row["pruned_accuracy"] <= 1.0 and 0.0 <= row["all_tokens_accuracy"] <= 1.0
        assert runs["budget_matched"]["role"] == "dense_budget_matched" and "time_to_dense_accuracy_s" in row
        run = runs["run"]
        assert [run["pruned_accuracy"], run["all_tokens_accuracy"]] == [
            row["pruned_accuracy_per_seed"][0], row["all_tokens_accuracy_per_seed"][0]]
    # token arms are configured pruned (their curve is); PatchDropout's model sees all tokens in evaluation
    assert rows["tokens_0.5"]["pruned_accuracy"] == rows["tokens_0.5"]["test_accuracy"]
    assert rows["random_tokens_0.5"]["pruned_accuracy"] == rows["random_tokens_0.5"]["test_accuracy"]
    assert rows["patch_dropout_0.5"]["all_tokens_accuracy"] == rows["patch_dropout_0.5"]["test_accuracy"]
    # PatchDropout keeps the share of patches with the training FLOPs of the whole tokens_0.5 run, its schedule
    # included (28x28 in 4x4 patches, layers 0 and 1)
    geometry = SparseViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                               image_size=28, patch_size=4, num_channels=1, num_labels=10)
    patch_dropout_run = result["runs"]["3"]["patch_dropout_0.5"]["run"]
    assert patch_dropout_run["patch_dropout_keep_ratio"] == matched_patch_dropout_keep_ratio(
        geometry, 0.5, KeepRatioSchedule())
    assert patch_dropout_run["patch_dropout_keep_ratio"] > matched_patch_dropout_keep_ratio(geometry, 0.5)
    assert result["runs"]["3"]["tokens_0.5"]["run"]["patch_dropout_keep_ratio"] is None

    # a JSON written before these columns (no such keys in its runs) resumes, its token columns not measured
    older = json.loads(path.read_text())
    for arm in arms:
        for key in ("pruned_accuracy", "all_tokens_accuracy", "patch_dropout_keep_ratio"):
            del older["runs"]["3"][arm]["run"][key]
    path.write_text(json.dumps(older))
    args, model_args = E2EArguments(**older["arguments"]), ModelArguments(**older["model"])
    rows = summarize(args, finished_seeds(str(path), args, model_args))
    assert [row["pruned_accuracy"] for row in rows] == [None] * 4
    assert [row["test_accuracy"] for row in rows] == [row["test_accuracy"] for row in result["rows"]]
    assert "tokens_0.5" in format_table(rows)


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


# --- hf-sparse train: the recipes from the package ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def tiny_image_folder(root: Path, per_class: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = (rng.integers(0, 60, (8, 8)) + 150 * label).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{index}.png")
    return root


def tiny_config(tmp_path: Path) -> Path:
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"dataset_name: {tiny_image_folder(tmp_path / 'images')}\nnum_channels: 1\nhidden_size: 16\n"
        "num_hidden_layers: 2\nnum_attention_heads: 2\nintermediate_size: 32\npatch_size: 2\n"
        f"output_dir: {tmp_path / 'run'}\nmax_steps: 2\nper_device_train_batch_size: 8\nreport_to: none\n"
        "save_strategy: 'no'\ndisable_tqdm: true\ntoken_keep_ratio: 0.8\n"
    )
    return config


def test_train_command_runs_a_recipe_from_a_config_with_overrides_and_writes_a_model(tmp_path):
    assert cli_main(["train", "tri-level", str(tiny_config(tmp_path)), "--token_keep_ratio", "0.5"]) == 0
    run = tmp_path / "run"
    assert (run / "model.safetensors").exists() and (run / "example_pruning.safetensors").exists()
    assert 0.0 <= json.loads((run / "eval_results.json").read_text())["eval_accuracy"] <= 1.0
    saved = json.loads((run / "config.json").read_text())
    assert saved["model_type"] == "sparse_vit" and saved["token_keep_ratio"] == 0.5  # the flag won over the YAML
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 2


def test_train_use_cpu_is_true_by_default_only_without_an_accelerator_and_the_users_value_wins(tmp_path, monkeypatch):
    from hf_sparse import TriLevelTrainingArguments
    from hf_sparse.experiments import common

    config = tiny_config(tmp_path)
    without_use_cpu = config.read_text()
    (tmp_path / "cpu_false.yaml").write_text(without_use_cpu + "use_cpu: false\n")

    def use_cpu(*argv: str, accelerator: bool = False, yaml: Path = config) -> bool:
        monkeypatch.setattr(common, "has_accelerator", lambda: accelerator)
        return common.parse_training_config(TriLevelTrainingArguments, [str(yaml), *argv])[2].use_cpu

    assert use_cpu() is True  # lets `accelerate launch` form a gloo group of CPU processes
    assert use_cpu(accelerator=True) is False
    # the user's false wins, in either spelling of the flag and in the YAML
    assert use_cpu("--use-cpu", "false") is False and use_cpu("--use_cpu", "false") is False
    assert use_cpu(yaml=tmp_path / "cpu_false.yaml") is False
    assert use_cpu("--use-cpu", "true", accelerator=True) is True


def test_train_input_errors_are_one_line_from_the_command_and_from_the_recipe_scripts(tmp_path, capsys):
    config = str(tiny_config(tmp_path))
    (tmp_path / "text" / "notes").mkdir(parents=True)
    (tmp_path / "text" / "notes" / "a.txt").write_text("not an image")
    cases = [
        (["--tokn_keep_ratio", "0.5"], "did you mean --token_keep_ratio"),
        (["--token_keep_ratio", "0"], "`token_keep_ratio` must be a number in (0, 1]"),
        (["--token_keep_ratio", "half"], "invalid float value: 'half'"),
        (["--dataset_name", str(tmp_path / "missing")], f"folder '{tmp_path / 'missing'}' does not exist"),
        (["--dataset_name", str(tmp_path / "text")], "holds no images"),
    ]
    for overrides, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["train", "tri-level", config, *overrides])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error, error
        # one line (before it, at most `datasets`' progress bar of reading the folder)
        assert error.strip().splitlines()[-1].startswith("hf-sparse train tri-level: error:")
        assert "Traceback" not in error and error.count("error:") == 1
    with pytest.raises(SystemExit):
        cli_main(["train", "tost", str(tmp_path / "missing.yaml")])
    assert "config file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    script = subprocess.run([sys.executable, str(ROOT / "recipes" / "tri_level.py"), config,
                             "--tokn_keep_ratio", "0.5"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "HF_SPARSE_TRACEBACK": ""})
    assert script.returncode == 2 and script.stderr.strip().count("\n") == 0, script.stderr[-3000:]
    assert "did you mean --token_keep_ratio" in script.stderr


def _no_installed_metadata(name: str) -> str:
    from importlib.metadata import PackageNotFoundError

    raise PackageNotFoundError(name)


def test_version_dashes_and_help_texts(capsys, monkeypatch):
    import hf_sparse
    from hf_sparse import __version__
    from hf_sparse.cli import build_parser

    with monkeypatch.context() as patch:  # --version answers without building the parser (importing every command)
        patch.setattr("hf_sparse.cli.build_parser", lambda: pytest.fail("--version built the parser"))
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-sparse {__version__}"
    # the version is written once, in pyproject.toml: installed metadata, or the file in an uninstalled checkout
    assert re.search(rf'(?m)^version = "{re.escape(__version__)}"$', (ROOT / "pyproject.toml").read_text())
    with monkeypatch.context() as patch:
        patch.setattr(hf_sparse, "_distribution_version", _no_installed_metadata)
        assert hf_sparse._package_version() == __version__
    parsed = build_parser().parse_args(["convert", "vit", "out", "--token-keep-ratio", "0.5", "--token-fusion"])
    assert parsed.token_keep_ratio == 0.5 and parsed.token_fusion  # dashes, as every other command takes them
    with pytest.raises(SystemExit):
        cli_main(["bench", "e2e", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "see above" not in text and "converged: 30 epochs on 10000 images" in text
    assert "--no_budget_matched, --no-budget-matched Turn off --budget_matched." in text
    with pytest.raises(SystemExit):
        cli_main(["train", "tri-level", "--help"])
    assert "--token_keep_ratio" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # ToST's help texts hold bare "%" signs, which argparse formats
        cli_main(["train", "tost", "--help"])
    assert exit_info.value.code == 0 and "--lottery_ticket_rounds" in capsys.readouterr().out


@needs_fashion_mnist
def test_bench_e2e_data_arms_run_infobatch_and_the_fixed_size_mode_side_by_side(tmp_path):
    """The data level's arms (issue 18): InfoBatch itself (a full first epoch, then below-mean-loss examples left out,
    so fewer images than dense) and our fixed-size mode, each with its budget-matched dense run."""
    path = tmp_path / "e2e.json"
    arms = ["data_infobatch", "data_infobatch_fixed_size"]
    command = ["bench", "e2e", "--output_dir", str(tmp_path), "--seeds", "5", "--max_train_samples", "128",
               "--max_eval_samples", "64", "--epochs", "3", "--evaluations", "1", "--batch_size", "16",
               "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--json", str(path)]
    cli_main([*command, "--variants", *arms])
    result = json.loads(path.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["dense", *arms]
    runs = result["runs"]["5"]
    dense_images = runs["dense"]["images_trained"]
    assert dense_images == 3 * 128
    # InfoBatch trains every example in epoch 0 and leaves some out in epoch 1 (delta 0.875 of 3 epochs: 2 prune)
    assert 2 * 128 < runs["data_infobatch"]["run"]["images_trained"] < dense_images
    # the fixed-size mode drops 0.3 of the examples in every epoch
    assert runs["data_infobatch_fixed_size"]["run"]["images_trained"] == 3 * round(0.7 * 128)
    for arm in arms:
        assert runs[arm]["budget_matched"]["role"] == "dense_budget_matched"
        assert "InfoBatch" in rows[arm]["label"]

    # Adding arms to a finished seed trains only them (dense and the InfoBatch arm are read back, not retrained; an
    # arm not asked for stays in the JSON); tokens alone for the combination's steps shares its budget-matched run.
    combination, tokens_alone = "infobatch_tokens_0.5", "tokens_0.5_steps_of_infobatch_tokens_0.5"
    with pytest.raises(SystemExit):  # the steps it matches must be trained first
        cli_main([*command, "--variants", tokens_alone, combination])
    cli_main([*command, "--variants", "data_infobatch", combination, tokens_alone])
    resumed = json.loads(path.read_text())
    added = resumed["runs"]["5"]
    assert added["dense"] == runs["dense"] and added["data_infobatch"] == runs["data_infobatch"]
    assert added["data_infobatch_fixed_size"] == runs["data_infobatch_fixed_size"]
    assert added[tokens_alone]["run"]["steps"] == added[combination]["run"]["steps"] < runs["dense"]["steps"]
    assert "budget_matched" not in added[tokens_alone]
    rows = {row["variant"]: row for row in resumed["rows"]}
    assert list(rows) == ["dense", "data_infobatch", combination, tokens_alone]
    assert rows[tokens_alone]["budget_matched_dense_accuracy"] == rows[combination]["budget_matched_dense_accuracy"]


def test_every_bench_e2e_arm_builds_and_the_fast_schedule_reaches_its_keep_ratio_in_a_tenth(tmp_path):
    """Each arm's model and arguments are built (and checked) before anything trains; the fast-schedule combination
    differs from the paper-schedule one only in reaching the final keep ratio over 1/10 of training, not 1/3."""
    from hf_sparse.experiments.bench_e2e import VARIANTS
    from hf_sparse.experiments.common import ModelArguments, PreparedData, training_fields
    from hf_sparse.experiments.runs import tri_level_run

    data = PreparedData(None, None, [str(label) for label in range(10)], 28, 1, (0.5,), (0.5,))
    model_args = ModelArguments(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    fields = training_fields(str(tmp_path), 1.0, 16, 0)
    built = {key: tri_level_run(data, model_args, 0, fields, variant, name=key) for key, variant in VARIANTS.items()}
    for key, (_, model, _) in built.items():
        assert model.config.token_keep_ratio == VARIANTS[key].token_keep_ratio, key
    fast, paper = built["infobatch_tokens_0.5_fast_schedule"][2], built["infobatch_tokens_0.5"][2]
    assert (fast.example_pruning, paper.example_pruning) == ("infobatch", "infobatch")
    reached = fast.sparsity_warmup_fraction + 0.1
    assert fast.keep_ratio_schedule.ratios(reached, 0.5, 1.0)[0] == 0.5
    assert fast.keep_ratio_schedule.ratios(reached - 0.06, 0.5, 1.0)[0] > 0.5
    assert paper.keep_ratio_schedule.ratios(reached, 0.5, 1.0)[0] > 0.5
