"""Self-contained SparseViT folders and Hub repos: weights, config with `auto_map`, remote code, image processor
config, a training report and a model card rendered from `model_cards/sparse_vit.md`.

`import hf_sparse` registers `write_save_extras` with SparseViT's `save_pretrained`, so a local folder, a
`model.push_to_hub` and a `Trainer.push_to_hub` (through the trainers' `create_model_card`) all carry the same
card; the trainers attach a `TrainingReport` to the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .sparsity import sparsity_report

REPORT_FILENAME = "hf_sparse_report.json"
CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "sparse_vit.md"
METHOD_SENTENCES = {
    "tri_level": "Tri-Level E-ViT training (example pruning, token pruning and attention sparsity at once).",
    "tost": "the ToST recipe for pruned networks (ghost neurons and skips, rescaled init, label smoothing).",
    "dense": "dense training (no sparsity during training).",
}


@dataclass
class TrainingReport:
    """What a card says about how the model was trained; saved beside the weights as `hf_sparse_report.json`."""

    method: str = "dense"
    dataset: str | None = None
    base_model: str | None = None
    test_accuracy: float | None = None
    train_seconds: float | None = None
    dense_train_seconds: float | None = None
    images_trained: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def time_saved(self) -> float | None:
        if self.train_seconds is None or not self.dense_train_seconds:
            return None
        return 1.0 - self.train_seconds / self.dense_train_seconds

    @classmethod
    def read(cls, directory: str | os.PathLike) -> TrainingReport | None:
        path = Path(directory) / REPORT_FILENAME
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls(**values)
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path} is not a valid hf_sparse training report: {error}") from error

    def write(self, directory: str | os.PathLike) -> None:
        (Path(directory) / REPORT_FILENAME).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")


def sparsity_settings(model, report: TrainingReport | None) -> list[tuple[str, str]]:
    config = model.config
    rows = [
        ("token keep ratio", f"{config.token_keep_ratio:g}"),
        ("token pruning layers", ", ".join(str(i) for i in config.token_pruning_layers) or "none"),
        ("token fusion", "on" if config.token_fusion else "off"),
        ("attention keep ratio", f"{config.attention_keep_ratio:g}"),
    ]
    weight_sparsity = getattr(config, "weight_sparsity", None)
    if weight_sparsity:
        rows += [(f"weight mask {key}", str(value)) for key, value in weight_sparsity.items()]
    else:
        report_of_zeros = sparsity_report(model)
        if report_of_zeros["prunable_zeros"]:
            rows.append(("zero weights in q/k/v/o and MLP projections", f"{report_of_zeros['prunable_sparsity']:.2%}"))
    if report is not None:
        rows += [(key.replace("_", " "), str(value)) for key, value in report.settings.items()]
    return rows


def build_model_card(model, report: TrainingReport | None, repo_id: str | None = None, has_processor: bool = False) -> ModelCard:
    """Render the project's card for `model` (metadata: library, tags, pipeline tag, data set, base model, eval
    results; body: sparsity settings, measured accuracy and time, how to load it)."""
    if not CARD_TEMPLATE.is_file():
        raise FileNotFoundError(f"The model card template {CARD_TEMPLATE} is missing (install hf_sparse from its repo).")
    report = report or TrainingReport()
    repo_id = repo_id or "<your-namespace>/<this-model>"
    model_name = repo_id.split("/")[-1]
    tags = ["hf_sparse", "sparse-vit", "vision", "image-classification"]
    tags += {"tri_level": ["tri-level-evit", "token-pruning"], "tost": ["tost", "sparse-training"]}.get(report.method, [])
    eval_results = None
    if report.test_accuracy is not None and report.dataset:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=report.dataset,
                dataset_name=report.dataset,
                dataset_split="test",
                metric_type="accuracy",
                metric_value=round(report.test_accuracy, 4),
            )
        ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=tags,
        datasets=[report.dataset] if report.dataset else None,
        base_model=report.base_model,
        model_name=model_name,
        eval_results=eval_results,
        metrics=["accuracy"] if eval_results else None,
    )
    results = []
    if report.test_accuracy is not None:
        results.append(("test accuracy", f"{100 * report.test_accuracy:.2f} %"))
    if report.train_seconds is not None:
        results.append(("training wall-clock", f"{report.train_seconds:.1f} s"))
    if report.dense_train_seconds is not None:
        results.append(("dense baseline wall-clock (same budget)", f"{report.dense_train_seconds:.1f} s"))
    if report.time_saved() is not None:
        results.append(("training time saved against dense", f"{100 * report.time_saved():.1f} %"))
    if report.images_trained is not None:
        results.append(("images trained", f"{report.images_trained:,}"))
    config = model.config
    architecture = (
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads, "
        f"MLP {config.intermediate_size}, image {config.image_size} with patch {config.patch_size} "
        f"({config.num_patches} patches), {config.num_channels} channel(s), {config.num_labels} labels"
        + (", DeiT distillation token" if config.use_distillation_token else "")
        + "."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        method_sentence=METHOD_SENTENCES.get(report.method, report.method),
        has_processor=has_processor,
        settings=sparsity_settings(model, report),
        results=results,
        time_note=(
            "Wall-clock is training time without evaluation, measured against a dense ViT trained with the same "
            "epochs and hyper-parameters on the same machine."
            if report.dense_train_seconds
            else None
        ),
        architecture=architecture,
    )


def write_save_extras(model, directory: str) -> None:
    """Called by SparseViT's `save_pretrained`: image processor config, training report and model card."""
    processor = getattr(model, "image_processor", None)
    if processor is not None:
        processor.save_pretrained(directory)
    report = getattr(model, "hf_sparse_report", None) or TrainingReport.read(directory)
    if report is not None:
        report.write(directory)
    has_processor = os.path.isfile(os.path.join(directory, "preprocessor_config.json"))
    repo_id = getattr(model, "hub_repo_id", None)
    build_model_card(model, report, repo_id=repo_id, has_processor=has_processor).save(os.path.join(directory, "README.md"))


def push_checkpoint(directory: str, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None):
    """`hf-sparse push`: publish a local SparseViT folder (a `save_pretrained` or Trainer output) with the card."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory!r} has no config.json: not a saved model folder.")
    model = AutoModelForImageClassification.from_pretrained(directory)
    if os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
        model.image_processor = AutoImageProcessor.from_pretrained(directory)
    model.hf_sparse_report = TrainingReport.read(directory)
    model.hub_repo_id = repo_id
    return model.push_to_hub(repo_id, private=private, token=token, commit_message=commit_message)
