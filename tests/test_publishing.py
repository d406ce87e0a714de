"""Publishing SparseViT checkpoints: self-contained folders, `hf_sparse.push_to_hub`, model.push_to_hub,
Trainer.push_to_hub, `hf-sparse push`, remote-code loading in a process without hf_sparse, and failures of the Hub
(against the local test server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import httpx
from transformers import AutoModelForImageClassification

import hf_sparse
from hf_sparse import SparseViTConfig, SparseViTForImageClassification, TrainingReport, TriLevelTrainer
from hf_sparse.cli import main as cli_main
from hf_sparse.data import image_processor_for

from tri_level_helpers import tiny_image_dataset, tiny_sparse_vit, with_tiny_transform

EXPECTED_FILES = {
    "model.safetensors",
    "config.json",
    "configuration_sparse_vit.py",
    "modeling_sparse_vit.py",
    "preprocessor_config.json",
    "README.md",
}
PIXELS = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)


PROCESSOR = image_processor_for(8, 1, (0.5,), (0.5,))
REPORT = TrainingReport(
    method="tri_level", dataset="fashion_mnist", test_accuracy=0.875, train_seconds=60.0,
    dense_train_seconds=100.0, images_trained=1234, settings={"example_pruning": "forgetting"},
)


def published_model(**config) -> SparseViTForImageClassification:
    return tiny_sparse_vit(token_keep_ratio=0.5, attention_keep_ratio=0.5, **config).eval()


def publish(model, repo_id: str):
    return hf_sparse.push_to_hub(model, repo_id, report=REPORT, image_processor=PROCESSOR)


def check_card(card: ModelCard, repo_id: str | None = None) -> None:
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert "hf_sparse" in data.tags and data.datasets == ["fashion_mnist"]
    assert data.eval_results[0].metric_type == "accuracy" and data.eval_results[0].metric_value == 0.875
    assert "token keep ratio | 0.5" in card.text and "attention keep ratio | 0.5" in card.text
    assert "87.50 %" in card.text and "40.0 %" in card.text  # accuracy and time saved against dense
    assert "This is the model card of a 🤗 transformers model" not in card.text
    if repo_id:
        assert f'from_pretrained("{repo_id}", trust_remote_code=True)' in card.text


def logits_in_fresh_process_without_hf_sparse(source: str, environment: dict | None = None) -> list[float]:
    """Load with trust_remote_code in a new interpreter where `import hf_sparse` fails."""
    code = (
        "import sys, json, torch\n"
        "sys.modules['hf_sparse'] = None  # the package cannot be imported\n"
        "from transformers import AutoModelForImageClassification\n"
        f"model = AutoModelForImageClassification.from_pretrained({source!r}, trust_remote_code=True).eval()\n"
        "assert type(model).__module__.startswith('transformers_modules'), type(model).__module__\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(model(torch.linspace(-1, 1, 64).view(1, 1, 8, 8)).logits[0].tolist()))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
        env={**os.environ, **(environment or {})}, cwd="/",
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def hub_environment(hub_server) -> dict:
    return {
        "HF_ENDPOINT": hub_server.url, "HF_TOKEN": hub_server.token, "HF_HOME": str(hub_server.hf_home),
        "HF_HUB_CACHE": str(hub_server.hub_cache), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
    }


def test_save_for_hub_writes_a_self_contained_folder(tmp_path):
    model = published_model()
    hf_sparse.save_for_hub(model, tmp_path, report=REPORT, image_processor=PROCESSOR)
    assert EXPECTED_FILES <= set(os.listdir(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_sparse_vit.SparseViTConfig",
        "AutoModel": "modeling_sparse_vit.SparseViTModel",
        "AutoModelForImageClassification": "modeling_sparse_vit.SparseViTForImageClassification",
    }
    check_card(ModelCard.load(tmp_path / "README.md"))
    with torch.no_grad():
        expected = model(PIXELS).logits[0].tolist()
    assert logits_in_fresh_process_without_hf_sparse(str(tmp_path)) == pytest.approx(expected, abs=1e-6)
    # with hf_sparse imported (here), no trust_remote_code is needed and the package's class is used
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded) is SparseViTForImageClassification


def test_push_to_hub_publishes_our_card_and_loads_remotely(hub_server):
    model = published_model()
    publish(model, "user/tiny-sparse-vit")
    files = set(hub_server.repo_files("user/tiny-sparse-vit"))
    assert EXPECTED_FILES <= files
    local = Path(snapshot_download("user/tiny-sparse-vit"))
    check_card(ModelCard.load(local / "README.md"), repo_id="user/tiny-sparse-vit")
    with torch.no_grad():
        expected = model(PIXELS).logits[0].tolist()
    remote = logits_in_fresh_process_without_hf_sparse("user/tiny-sparse-vit", hub_environment(hub_server))
    assert remote == pytest.approx(expected, abs=1e-6)
    with_package = AutoModelForImageClassification.from_pretrained("user/tiny-sparse-vit").eval()
    with torch.no_grad():
        assert with_package(PIXELS).logits[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_tri_level_trainer_push_to_hub_writes_our_card(hub_server, tmp_path):
    data = with_tiny_transform(tiny_image_dataset(32))
    from hf_sparse import TriLevelTrainingArguments

    args = TriLevelTrainingArguments(
        output_dir=str(tmp_path / "run"), num_train_epochs=1, per_device_train_batch_size=8, report_to=[],
        save_strategy="no", use_cpu=True, token_keep_ratio=0.5, hub_model_id="user/tri-level-run",
        example_pruning="forgetting", example_inactive_fraction=0.25, disable_tqdm=True,
    )
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data, processing_class=PROCESSOR)
    trainer.train()
    trainer.push_to_hub(dataset="fashion_mnist")  # keyword arguments go to create_model_card, as in transformers
    files = set(hub_server.repo_files("user/tri-level-run"))
    assert EXPECTED_FILES <= files and "example_pruning.safetensors" in files
    card = ModelCard.load(Path(snapshot_download("user/tri-level-run")) / "README.md")
    assert "hf_sparse" in card.data.tags and "tri-level-evit" in card.data.tags
    assert card.data.datasets == ["fashion_mnist"] and card.data.model_name == "tri-level-run"
    assert 'from_pretrained("user/tri-level-run", trust_remote_code=True)' in card.text and "<" not in card.text
    assert "example pruning | forgetting" in card.text and "images trained | 24" in card.text
    assert "This is the model card" not in card.text and "generated automatically" not in card.text


def test_cli_push_publishes_an_existing_checkpoint_with_the_same_card(hub_server, tmp_path):
    model = published_model()
    hf_sparse.save_for_hub(model, tmp_path / "checkpoint", report=REPORT, image_processor=PROCESSOR)
    assert cli_main(["push", str(tmp_path / "checkpoint"), "user/from-cli"]) == 0
    local = Path(snapshot_download("user/from-cli"))
    assert EXPECTED_FILES <= set(os.listdir(local))
    check_card(ModelCard.load(local / "README.md"), repo_id="user/from-cli")
    with pytest.raises(SystemExit):
        cli_main(["push", str(tmp_path / "missing"), "user/nothing"])


def test_failures_give_clear_errors_keep_the_local_folder_and_a_retry_succeeds(hub_server, tmp_path, capsys):
    model = published_model()
    hf_sparse.save_for_hub(model, tmp_path / "local", report=REPORT, image_processor=PROCESSOR)
    before = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}

    hub_server.stop()
    assert cli_main(["push", str(tmp_path / "local"), "user/flaky"]) == 1
    message = capsys.readouterr().err
    assert "user/flaky" in message and hub_server.url in message and "ConnectError" in message and "retry" in message
    with pytest.raises(httpx.ConnectError):
        publish(model, "user/flaky")
    hub_server.start()

    hub_server.fail_next("*", r".*", status=401, count=None)
    with pytest.raises(HfHubHTTPError) as unauthorised:
        publish(model, "user/flaky")
    assert unauthorised.value.response.status_code == 401
    hub_server.clear_failures()

    hub_server.fail_next("POST", r"/commit/main$", status=500, count=1)
    with pytest.raises(HfHubHTTPError) as server_error:
        publish(model, "user/flaky")
    assert server_error.value.response.status_code == 500
    assert "config.json" not in set(hub_server.repo_files("user/flaky"))

    after = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    assert after == before  # the local checkpoint is untouched by failed pushes
    publish(model, "user/flaky")  # the retry goes through, complete
    assert EXPECTED_FILES <= set(hub_server.repo_files("user/flaky"))


def test_what_save_pretrained_writes_does_not_depend_on_imports(tmp_path, hub_server):
    """No hidden hook: the package's class and the remote-code class (no hf_sparse) save the same files, and a plain
    `model.push_to_hub` (transformers' generic card) still publishes a model that loads remotely."""
    model = published_model()
    model.save_pretrained(tmp_path / "package")
    files = set(os.listdir(tmp_path / "package"))
    assert files == {"model.safetensors", "config.json", "configuration_sparse_vit.py", "modeling_sparse_vit.py",
                     "convert_vit.py"}
    code = (
        "import sys, os\n"
        "sys.modules['hf_sparse'] = None\n"
        "from transformers import AutoModelForImageClassification\n"
        f"model = AutoModelForImageClassification.from_pretrained({str(tmp_path / 'package')!r}, trust_remote_code=True)\n"
        f"model.save_pretrained({str(tmp_path / 'remote')!r})\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd="/")
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert set(os.listdir(tmp_path / "remote")) == files
    assert json.loads((tmp_path / "remote" / "config.json").read_text())["auto_map"] == json.loads(
        (tmp_path / "package" / "config.json").read_text())["auto_map"]

    model.push_to_hub("user/plain-push")
    assert files <= set(hub_server.repo_files("user/plain-push"))
    with torch.no_grad():
        expected = model(PIXELS).logits[0].tolist()
    remote = logits_in_fresh_process_without_hf_sparse("user/plain-push", hub_environment(hub_server))
    assert remote == pytest.approx(expected, abs=1e-6)
    assert isinstance(SparseViTConfig().auto_map, dict)


def test_tost_trainer_push_to_hub_writes_our_card_with_the_mask(hub_server, tmp_path):
    from hf_sparse import ToSTTrainer, ToSTTrainingArguments

    data = with_tiny_transform(tiny_image_dataset(32), train=False)
    args = ToSTTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, report_to=[],
        save_strategy="no", use_cpu=True, hub_model_id="user/tost-run", mask_method="magnitude", sparsity=0.9,
        rescaled_init="density", disable_tqdm=True,
    )
    trainer = ToSTTrainer(
        model=tiny_sparse_vit(), args=args, train_dataset=data, processing_class=image_processor_for(8, 1, (0.5,), (0.5,))
    )
    trainer.train()
    trainer.push_to_hub()
    files = set(hub_server.repo_files("user/tost-run"))
    assert EXPECTED_FILES <= files and "sparsity_masks.safetensors" in files
    local = Path(snapshot_download("user/tost-run"))
    card = ModelCard.load(local / "README.md")
    assert "tost" in card.data.tags and "weight mask method | magnitude" in card.text
    assert "ghost soft neurons | True" in card.text and "rescaled init | density" in card.text
    assert "This is the model card" not in card.text
    reloaded = AutoModelForImageClassification.from_pretrained(local)
    zeros = sum(int((m.weight == 0).sum()) for n, m in reloaded.named_modules() if n.endswith(("q_proj", "fc1")))
    assert zeros > 0 and reloaded.config.weight_sparsity["method"] == "magnitude"


def test_a_failing_card_never_costs_the_weights_or_the_checkpoint(tmp_path, monkeypatch, caplog):
    import hf_sparse.hub

    def broken(*args, **kwargs):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(hf_sparse.hub, "build_model_card", broken)
    hf_sparse.save_for_hub(published_model(), tmp_path / "folder", report=REPORT, image_processor=PROCESSOR)
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= set(os.listdir(tmp_path / "folder"))
    from hf_sparse import TriLevelTrainingArguments

    args = TriLevelTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        save_strategy="steps", save_steps=1, example_pruning="forgetting", example_inactive_fraction=0.25,
        disable_tqdm=True,
    )
    TriLevelTrainer(model=tiny_sparse_vit(), args=args, train_dataset=with_tiny_transform(tiny_image_dataset(32))).train()
    for step in (1, 2):
        files = set(os.listdir(tmp_path / "run" / f"checkpoint-{step}"))
        assert {"model.safetensors", "trainer_state.json", "example_pruning.safetensors"} <= files
    assert any("template exploded" in record.getMessage() for record in caplog.records)


def test_push_to_hub_refuses_a_wrong_argument_type_before_anything_is_uploaded(hub_server, tmp_path):
    model = published_model()
    # save_for_hub runs the same checks before it writes anything (no folder without a README)
    folder = tmp_path / "folder"
    with pytest.raises(TypeError, match=r"`report` must be a hf_sparse.TrainingReport.*dict"):
        hf_sparse.save_for_hub(model, folder, report={"method": "tost"})
    with pytest.raises(TypeError, match=r"`repo_id` must be a str \('namespace/name'\) or None"):
        hf_sparse.save_for_hub(model, folder, repo_id=["user", "typed"])
    with pytest.raises(TypeError, match="`image_processor`"):
        hf_sparse.save_for_hub(model, folder, image_processor="preprocessor_config.json")
    assert not folder.exists()
    hub_server.clear_requests()
    with pytest.raises(TypeError, match=r"`report` must be a hf_sparse.TrainingReport.*dict.*TrainingReport\(\*\*values\)"):
        hf_sparse.push_to_hub(model, "user/typed", report={"a": 1})
    with pytest.raises(TypeError, match="`image_processor`"):
        hf_sparse.push_to_hub(model, "user/typed", image_processor="preprocessor_config.json")
    with pytest.raises(TypeError, match="`model`"):
        hf_sparse.push_to_hub(model.state_dict(), "user/typed")
    assert hub_server.count_requests() == 0  # no repo created, nothing uploaded


def card_summary_and_rows(card: ModelCard) -> tuple[str, list[str]]:
    """The card's one-line summary of how the model was trained, and the labels of its settings table."""
    summary = next(line for line in card.text.splitlines() if line.startswith("A **"))
    settings = card.text.split("## Sparsity settings", 1)[1].split("##", 1)[0]
    labels = [line.split("|")[1].strip() for line in settings.splitlines() if line.startswith("| ")]
    return summary, labels[1:]  # without the header row


def test_a_tost_card_with_only_label_smoothing_on_says_label_smoothing_and_not_ghosts(tmp_path):
    from hf_sparse import ToSTTrainer, ToSTTrainingArguments

    from tri_level_helpers import tiny_resnet

    def card(**technique):
        args = ToSTTrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                     report_to=[], use_cpu=True, mask_method="magnitude", sparsity=0.5,
                                     disable_tqdm=True, **technique)
        trainer = ToSTTrainer(model=tiny_resnet(), args=args, train_dataset=with_tiny_transform(tiny_image_dataset(16)))
        trainer.setup_sparsity()
        return card_summary_and_rows(hf_sparse.hub.build_model_card(trainer.model, trainer.training_report()))

    # label smoothing alone on a ResNet (ghosts, GradInit and density rescaling off: the CNN recipe's)
    summary, labels = card(label_smoothing=0.1)
    assert "label smoothing 0.1" in summary and "50 %-sparse weight mask (magnitude)" in summary
    assert "ghost" not in summary and "rescaled init" not in summary
    assert len(labels) == len(set(labels)) and "mask method" not in labels and "weight mask method" in labels
    # the CNN recipe itself is vanilla sparse training: the card does not claim ToST's recipe
    summary, _ = card()
    assert "vanilla sparse training" in summary and "ToST recipe" not in summary


def test_a_tri_level_card_with_token_pruning_alone_names_only_token_pruning(tmp_path):
    from hf_sparse import TriLevelTrainingArguments

    args = TriLevelTrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                     report_to=[], use_cpu=True, token_keep_ratio=0.5, disable_tqdm=True)
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=args, train_dataset=with_tiny_transform(tiny_image_dataset(16)))
    summary, labels = card_summary_and_rows(hf_sparse.hub.build_model_card(trainer.model, trainer.training_report()))
    assert "token pruning (keep ratio 0.5 in layers 0, 1)" in summary
    assert "example pruning" not in summary and "attention sparsity" not in summary
    assert len(labels) == len(set(labels)) and "example inactive fraction" not in labels
    assert "token pruning layers" in labels
    dense = TriLevelTrainer(model=tiny_sparse_vit(), args=TriLevelTrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, token_keep_ratio=1.0))
    summary, labels = card_summary_and_rows(hf_sparse.hub.build_model_card(dense.model, dense.training_report()))
    assert "all three levels off" in summary and "token/attention schedule" not in labels
    assert "token pruning layers" not in labels  # the config's default layers, but no token was pruned


def tri_level_card(model, tmp_path) -> tuple[str, list[str], str]:
    """The summary, the settings labels and the whole text of a Tri-Level trainer's card for `model`."""
    from hf_sparse import TriLevelTrainingArguments

    args = TriLevelTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                     token_keep_ratio=model.config.token_keep_ratio)
    trainer = TriLevelTrainer(model=model, args=args)
    card = hf_sparse.hub.build_model_card(trainer.model, trainer.training_report())
    return (*card_summary_and_rows(card), card.text)


def test_a_card_says_random_token_selection_and_patch_dropout_only_where_they_ran(tmp_path):
    summary, labels, text = tri_level_card(tiny_sparse_vit(token_keep_ratio=0.5, token_selection="random"), tmp_path)
    assert "token pruning with random selection (keep ratio 0.5 in layers 0, 1)" in summary
    assert "token selection | random" in text
    assert "PatchDropout" not in text and "patch dropout keep ratio" not in labels

    summary, labels, text = tri_level_card(tiny_sparse_vit(patch_dropout_keep_ratio=0.49), tmp_path)
    assert "PatchDropout (keep 0.49 of the patches in training)" in summary and "dense" not in summary
    assert "patch dropout keep ratio | 0.49" in text and "token selection" not in labels

    both = tiny_sparse_vit(token_keep_ratio=0.5, patch_dropout_keep_ratio=0.49)
    summary, _, _ = tri_level_card(both, tmp_path)
    assert "token pruning (keep ratio 0.5 in layers 0, 1) and PatchDropout (keep 0.49" in summary
    summary = hf_sparse.hub.method_sentence(both, TrainingReport())  # a report-less card (a plain Trainer's model)
    assert "PatchDropout (keep 0.49" in summary and "no sparsity" not in summary

    # the defaults (CLS-attention selection, PatchDropout off) go unsaid; random selection without pruning never ran
    for model in (tiny_sparse_vit(token_keep_ratio=0.5), tiny_sparse_vit(token_selection="random")):
        summary, labels, text = tri_level_card(model, tmp_path)
        assert "random" not in text and "PatchDropout" not in text and "patch dropout" not in text.lower()
        assert "token selection" not in labels and "cls_attention" not in text
