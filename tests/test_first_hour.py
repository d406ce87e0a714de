"""What a new user meets in the first hour: the model's own sparsity, data checked before training, local image
folders and the CLI, early argument errors, `hf-sparse evaluate`, and `from_vit` with a Hub id."""

from __future__ import annotations

import json
import logging
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification

from hf_sparse import SparseViTConfig, SparseViTForImageClassification, TriLevelTrainer, TriLevelTrainingArguments
from hf_sparse import save_for_hub
from hf_sparse.cli import main as cli_main
from hf_sparse.data import image_processor_for
from hf_sparse.experiments.common import DataArguments, prepare_data

from tri_level_helpers import tiny_image_dataset, tiny_sparse_vit, with_tiny_transform


def arguments(output_dir, **overrides) -> TriLevelTrainingArguments:
    fields = dict(output_dir=str(output_dir), num_train_epochs=1, per_device_train_batch_size=8, report_to=[],
                  save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1, example_pruning="forgetting",
                  example_inactive_fraction=0.25,
                  sparsity_warmup_fraction=0.0, sparsity_decay_fraction=0.0)
    fields.update(overrides)
    return TriLevelTrainingArguments(**fields)


def image_folder(root, classes=("cat", "dog"), per_class=10, size=8):
    """A flat image folder (one sub-folder per class, no train/test split)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 60, (size, size)).astype(np.uint8) + 150 * label
            Image.fromarray(pixels, mode="L").save(root / name / f"{index}.png")
    return root


# --- 2: the model's own sparsity ----------------------------------------------------------------------------------


def test_arguments_default_to_the_models_own_ratios_and_a_conflict_is_said_once(tmp_path, caplog):
    data = with_tiny_transform(tiny_image_dataset(32))
    model = tiny_sparse_vit(token_keep_ratio=0.5, attention_keep_ratio=0.5)
    trainer = TriLevelTrainer(model=model, args=arguments(tmp_path / "a"), train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "a" / "final"))
    saved = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert saved["token_keep_ratio"] == 0.5 and saved["attention_keep_ratio"] == 0.5
    logged = [entry for entry in trainer.state.log_history if "token_keep_ratio" in entry]
    assert logged[-1]["token_keep_ratio"] == 0.5 and logged[-1]["tokens_per_image"] < 17  # trained sparse

    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        trainer = TriLevelTrainer(model=tiny_sparse_vit(token_keep_ratio=0.5), train_dataset=data,
                                  args=arguments(tmp_path / "b", token_keep_ratio=0.8))
    messages = [record.getMessage() for record in caplog.records if "token_keep_ratio" in record.getMessage()]
    assert len(messages) == 1 and "0.8" in messages[0] and "0.5" in messages[0]
    assert trainer.model.config.token_keep_ratio == 0.8 and trainer.model.config.attention_keep_ratio == 1.0


# --- 4: data checked against the model before training --------------------------------------------------------------


def test_missing_labels_and_out_of_range_labels_fail_before_the_first_step(tmp_path):
    images = tiny_image_dataset(16)
    no_labels = images.remove_columns("label").with_transform(
        lambda batch: {"pixel_values": torch.zeros(len(batch["image"]), 1, 8, 8)}
    )
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path), train_dataset=no_labels)
    with pytest.raises(ValueError, match=r"\['image'\].*no labels"):
        trainer.train()
    assert trainer.state.global_step == 0

    five_classes = tiny_image_dataset(16, num_classes=5)
    with pytest.raises(ValueError, match=r"ClassLabel with 5 classes.*num_labels`=4"):
        TriLevelTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path),
                        train_dataset=with_tiny_transform(five_classes)).train()
    raw = datasets.Dataset.from_dict({"pixel_values": [[[[0.0] * 8] * 8]] * 4, "label": [0, 1, 7, 2]}).with_format("torch")
    with pytest.raises(ValueError, match=r"labels \[7\] outside \[0, 4\)"):
        TriLevelTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path), train_dataset=raw).train()


# --- 5: local data and the CLI ---------------------------------------------------------------------------------------


def test_a_flat_image_folder_gets_a_seeded_stratified_held_out_split(tmp_path, caplog):
    folder = image_folder(tmp_path / "images")
    with caplog.at_level(logging.WARNING):
        first = prepare_data(DataArguments(dataset_name=str(folder), held_out_fraction=0.2), seed=3)
    again = prepare_data(DataArguments(dataset_name=str(folder), held_out_fraction=0.2), seed=3)
    assert len(first.train) == 16 and len(first.eval) == 4 and first.label_names == ["cat", "dog"]
    labels = first.eval.with_format(None)["label"]
    assert sorted(labels) == [0, 0, 1, 1]  # stratified
    assert labels == again.eval.with_format(None)["label"]
    assert any("no 'test' split" in record.getMessage() and "seed 3" in record.getMessage() for record in caplog.records)


def test_the_demo_runs_on_a_local_folder_with_one_evaluation(tmp_path):
    folder = image_folder(tmp_path / "images", per_class=16)
    output = tmp_path / "demo"
    assert cli_main(["demo", "--dataset_name", str(folder), "--output_dir", str(output), "--epochs", "1",
                     "--evaluations", "1", "--batch_size", "8", "--hidden_size", "16", "--num_hidden_layers", "2",
                     "--num_attention_heads", "2", "--patch_size", "2"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert all(len(run["curve"]) == 1 for run in results["runs"])  # one evaluation each, at the end
    assert results["arguments"]["dataset_name"] == str(folder)


def test_bad_cli_input_is_one_clear_line_and_a_non_zero_exit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--dataset_name", str(tmp_path / "missing"), "--output_dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert error.strip().count("\n") == 0 and str(tmp_path / "missing") in error and error.startswith("hf-sparse demo")
    for bad in (["--evaluations", "0"], ["--epochs", "many"], ["--example_pruning", "dropout"]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["demo", "--output_dir", str(tmp_path), *bad])
        assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_demo_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "(default: 2.0)" in text and "{forgetting,infobatch,infobatch_fixed_size,random,none}" in text


# --- 6: argument problems found early --------------------------------------------------------------------------------


def test_argument_problems_are_found_when_they_are_made(tmp_path):
    with pytest.raises(ValueError, match=r"example_swap_fraction.*example_inactive_fraction"):
        arguments(tmp_path, example_swap_fraction=0.5)
    with pytest.raises(ValueError, match=r"example_inactive_fraction.*example_pruning='none'"):
        arguments(tmp_path, example_pruning="none", example_inactive_fraction=0.2)
    assert arguments(tmp_path, example_pruning="none", example_inactive_fraction=None).example_inactive_fraction == 0
    with pytest.raises(ValueError, match=r"tokn_keep_ratio"):
        SparseViTForImageClassification.from_vit(tiny_vit(), tokn_keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"patch_size.*must divide.*image_size"):
        SparseViTConfig(image_size=10, patch_size=4)


def test_a_resume_mismatch_names_the_argument_and_the_checkpoint(tmp_path):
    data = with_tiny_transform(tiny_image_dataset(64), train=False)
    TriLevelTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path, save_strategy="steps", save_steps=3),
                    train_dataset=data).train()
    other = TriLevelTrainer(model=tiny_sparse_vit(), train_dataset=data,
                            args=arguments(tmp_path, save_strategy="steps", save_steps=3, example_inactive_fraction=0.5))
    checkpoint = str(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match="example_inactive_fraction") as error:
        other.train(resume_from_checkpoint=checkpoint)
    assert checkpoint in str(error.value) and "epoch_size" in str(error.value)


# --- 7: hf-sparse evaluate -------------------------------------------------------------------------------------------


def tiny_vit(**overrides) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
                  patch_size=2, num_channels=1, num_labels=2, id2label={0: "cat", 1: "dog"},
                  label2id={"cat": 0, "dog": 1})
    config.update(overrides)
    return ViTForImageClassification(ViTConfig(**config))


def test_evaluate_reports_accuracy_and_throughput_of_dense_and_sparse_checkpoints(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", per_class=6)
    processor = image_processor_for(8, 3, (0.5,) * 3, (0.5,) * 3)
    dense = tiny_vit(num_channels=3)  # the image pipeline feeds RGB: a 1-channel HF ViT cannot be served
    dense.save_pretrained(tmp_path / "dense")
    processor.save_pretrained(tmp_path / "dense")
    sparse = SparseViTForImageClassification.from_vit(dense, token_keep_ratio=0.5)
    save_for_hub(sparse, tmp_path / "sparse", image_processor=processor)
    path = tmp_path / "evaluation.json"
    assert cli_main(["evaluate", "--models", str(tmp_path / "dense"), str(tmp_path / "sparse"), "--dataset_name",
                     str(folder), "--split", "test", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [row["type"] for row in rows] == ["vit", "sparse_vit"] and rows[0]["throughput_ratio"] == 1.0
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["samples_per_second"] > 0 for row in rows)
    assert rows[1]["token_keep_ratio"] == 0.5
    with torch.no_grad():  # the evaluator's accuracy is the model's own on the held-out images
        held_out = prepare_data(DataArguments(dataset_name=str(folder), image_size=8, num_channels=3,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)).eval
        batch = held_out[: len(held_out)]
        expected = float((dense(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).float().mean())
    assert rows[0]["accuracy"] == pytest.approx(expected)
    assert "images/s" in capsys.readouterr().out


# --- 8: from_vit with a Hub id ---------------------------------------------------------------------------------------


def test_from_vit_takes_a_hub_id(hub_server, tmp_path):
    vit = tiny_vit()
    vit.push_to_hub("user/tiny-vit")
    local = SparseViTForImageClassification.from_vit(vit)
    remote = SparseViTForImageClassification.from_vit("user/tiny-vit", token_keep_ratio=1.0)
    pixels = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(remote(pixels).logits, local(pixels).logits)
    assert cli_main(["convert", "user/tiny-vit", str(tmp_path / "converted")]) == 0
    assert os.path.isfile(tmp_path / "converted" / "model.safetensors")


# --- issue 20: the first hour, second pass ---------------------------------------------------------------------------


def one_line_error(capsys, command: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(command)
    error = capsys.readouterr().err
    # one line (before it, at most the progress bars of `datasets` reading a folder or a model being converted)
    assert exit_info.value.code == 2 and "Traceback" not in error and error.count("error:") == 1, error
    assert error.strip().splitlines()[-1].startswith(f"hf-sparse {command[0]}"), error
    return error


def test_demo_checks_every_argument_before_anything_trains(tmp_path, capsys, monkeypatch):
    def trains(*args, **kwargs):
        raise AssertionError("the dense run started before the arguments were checked")

    monkeypatch.setattr("hf_sparse.experiments.demo.train_dense", trains)
    folder = image_folder(tmp_path / "images")
    output = tmp_path / "demo"
    tiny = ["--dataset_name", str(folder), "--output_dir", str(output), "--hidden_size", "16", "--num_hidden_layers",
            "2", "--num_attention_heads", "2", "--patch_size", "2"]
    for bad, named in [(["--token_keep_ratio", "1.5"], "`token_keep_ratio`"), (["--patch_size", "3"], "`patch_size` 3"),
                       (["--epochs", "-1"], "`epochs`"), (["--max_train_samples", "-5"], "`max_train_samples`"),
                       (["--attention_keep_ratio", "0"], "`attention_keep_ratio`"),
                       (["--example_inactive_fraction", "0.2"], "`example_inactive_fraction`"),
                       (["--hidden_size", "15"], "`hidden_size`=15 must be a multiple of `num_attention_heads`")]:
        assert named in one_line_error(capsys, ["demo", *tiny, *bad])
    assert not output.exists()  # nothing written either


def test_bench_throughput_refuses_a_device_torch_does_not_know_in_one_line(capsys):
    assert "`device`='tpu' is not a torch device" in one_line_error(capsys, ["bench", "throughput", "--device", "tpu"])


def test_a_device_this_machine_lacks_is_refused_before_anything_runs(capsys, monkeypatch):
    from types import SimpleNamespace

    from hf_sparse.cli import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, without MPS
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    check_devices([SimpleNamespace(device="cuda"), SimpleNamespace(device="cuda:0"), SimpleNamespace(device="cpu")])
    error = one_line_error(capsys, ["bench", "throughput", "--device", "cuda:7"])
    assert "`device`='cuda:7': this machine has 1 cuda device(s), cuda:0 to cuda:0" in error
    with pytest.raises(ValueError, match="`device`='mps': no mps device is available here"):
        check_devices([SimpleNamespace(device="mps")])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="`device`='cuda': no cuda device is available here"):
        check_devices([SimpleNamespace(device="cuda")])


def test_evaluate_refuses_a_split_that_does_not_exist_and_lists_the_splits(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", per_class=4)
    tiny_vit(num_channels=3).save_pretrained(tmp_path / "model")
    error = one_line_error(capsys, ["evaluate", "--models", str(tmp_path / "model"), "--dataset_name", str(folder),
                                    "--split", "tset"])
    assert "`split`='tset' is not a split" in error and "['train']" in error and "'test': a held-out part" in error
    with pytest.raises(ValueError, match=r"`eval_split`='validation' is not a split .* has \['train'\]"):
        prepare_data(DataArguments(dataset_name=str(folder), eval_split="validation"))


def test_a_missing_local_folder_is_said_to_be_missing_not_a_bad_hub_id(tmp_path, capsys):
    missing = str(tmp_path / "no" / "such")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparseViTForImageClassification.from_vit(missing)
    for command in (["evaluate", "--models", missing], ["convert", missing, str(tmp_path / "out")],
                    ["convert", "./no/such", str(tmp_path / "out")], ["demo", "--dataset_name", missing]):
        error = one_line_error(capsys, command)
        assert "does not exist" in error and "Repo id" not in error
    assert not (tmp_path / "out").exists()


def test_evaluate_serves_one_channel_models_and_says_to_set_id2label(tmp_path, capsys):
    from transformers import ResNetConfig, ResNetForImageClassification

    folder = image_folder(tmp_path / "images", per_class=6)
    processor = image_processor_for(8, 1, (0.5,), (0.5,))  # what training saves beside a one-channel model
    torch.manual_seed(0)
    resnet = ResNetForImageClassification(ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=2,
        id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})).eval()
    save_for_hub(resnet, tmp_path / "resnet", image_processor=processor)
    save_for_hub(tiny_vit(), tmp_path / "grey_vit", image_processor=processor)
    path = tmp_path / "evaluation.json"
    assert cli_main(["evaluate", "--models", str(tmp_path / "resnet"), str(tmp_path / "grey_vit"), "--dataset_name",
                     str(folder), "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    with torch.no_grad():  # the accuracy is the model's own on the grey held-out images
        held_out = prepare_data(DataArguments(dataset_name=str(folder), image_size=8, num_channels=1,
                                              image_mean=[0.5], image_std=[0.5])).eval
        batch = held_out[: len(held_out)]
        predictions = resnet(pixel_values=batch["pixel_values"]).logits.argmax(-1)
        expected = float((predictions == batch["labels"]).float().mean())
    assert [row["type"] for row in rows] == ["resnet", "vit"] and rows[0]["accuracy"] == pytest.approx(expected)
    capsys.readouterr()
    tiny_vit(num_channels=3, id2label=None, label2id=None).save_pretrained(tmp_path / "unnamed")
    error = one_line_error(capsys, ["evaluate", "--models", str(tmp_path / "unnamed"), "--dataset_name", str(folder)])
    assert "LABEL_0" in error and "id2label" in error


def test_evaluate_refuses_a_grey_models_processor_whose_normalisation_differs_per_channel(tmp_path, capsys):
    """The pipeline feeds a one-channel model the luma of RGB pixels; that equals normalising the grey image only
    when the processor normalises the three channels alike."""
    folder = image_folder(tmp_path / "images", per_class=6)
    save_for_hub(tiny_vit(), tmp_path / "grey_vit", image_processor=image_processor_for(8, 3, (0.1, 0.5, 0.9),
                                                                                        (0.5, 0.5, 0.5)))
    error = one_line_error(capsys, ["evaluate", "--models", str(tmp_path / "grey_vit"), "--dataset_name", str(folder)])
    assert "has num_channels=1 but its image processor's image_mean differs per channel ([0.1, 0.5, 0.9])" in error


def test_every_hint_names_an_option_that_exists(tmp_path, capsys):
    from hf_sparse.cli import build_parser
    from hf_sparse.data import prepare_image_classification_columns

    no_image = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match="`image_column` \\(`--image_column` on the command line\\)"):
        prepare_image_classification_columns(no_image)
    parser = build_parser()
    for command in (["demo"], ["evaluate", "--models", "m"]):
        assert parser.parse_args([*command, "--image_column", "img"]).image_column == "img"
    with pytest.raises(SystemExit):
        cli_main(["train", "tri-level", "--help"])
    assert "--image_column" in capsys.readouterr().out
