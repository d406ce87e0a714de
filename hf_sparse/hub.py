"""Model cards and publishing: a training report, a card rendered from `model_cards/model_card.md` (shipped inside
the package), Hub-ready folders and uploads.

Nothing here is hooked into `save_pretrained`: a model saves as transformers saves it (weights, config, and for
SparseViT its code and `auto_map`), whatever was imported. The card is written explicitly: by the trainers (every
`save_model`, checkpoints included, and `Trainer.push_to_hub` through `create_model_card`), by `save_for_hub` /
`push_to_hub` here, and by `hf-sparse push`. A card that cannot be written is logged and never costs the weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .logging_utils import get_logger

logger = get_logger(__name__)

REPORT_FILENAME = "hf_sparse_report.json"
CARD_TEMPLATE = "model_card.md"
DENSE_SENTENCE = "dense training (no sparsity during training)."
PLACEHOLDER_REPO_ID = "<your-namespace>/<this-model>"


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


def card_template() -> str:
    """The card template's text, read from the installed package."""
    return resources.files("hf_sparse").joinpath("model_cards", CARD_TEMPLATE).read_text(encoding="utf-8")


def _is_sparse_vit(model) -> bool:
    return getattr(model.config, "model_type", None) == "sparse_vit"


def _setting(report: TrainingReport, name: str) -> Any:
    """A setting of the report by its card label (`example pruning` also finds `example_pruning`), or None."""
    return next((value for key, value in report.settings.items() if key.replace("_", " ") == name), None)


def _prunes_tokens(model) -> bool:
    config = model.config
    return _is_sparse_vit(model) and config.token_keep_ratio < 1 and bool(config.token_pruning_layers)


def _random_token_selection(model) -> bool:
    """Whether training kept a uniform random subset at the pruning layers (the control), not the CLS-attended one."""
    return _prunes_tokens(model) and getattr(model.config, "token_selection", "cls_attention") == "random"


def _patch_dropout_keep_ratio(model) -> float | None:
    """PatchDropout's keep ratio where it was on (below 1.0), else None."""
    keep_ratio = getattr(model.config, "patch_dropout_keep_ratio", 1.0) if _is_sparse_vit(model) else 1.0
    return keep_ratio if keep_ratio < 1 else None


def _token_pruning(model) -> str | None:
    if not _prunes_tokens(model):
        return None
    config = model.config
    layers = ", ".join(str(index) for index in config.token_pruning_layers)
    selection = " with random selection" if _random_token_selection(model) else ""  # the default (CLS) goes unsaid
    return f"token pruning{selection} (keep ratio {config.token_keep_ratio:g} in layers {layers})"


def _patch_dropout(model) -> str | None:
    keep_ratio = _patch_dropout_keep_ratio(model)
    return None if keep_ratio is None else f"PatchDropout (keep {keep_ratio:g} of the patches in training)"


def _attention_sparsity(model) -> str | None:
    if not _is_sparse_vit(model) or model.config.attention_keep_ratio >= 1:
        return None
    return f"attention sparsity (keep ratio {model.config.attention_keep_ratio:g})"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _tri_level_sentence(model, report: TrainingReport) -> str:
    example_pruning = _setting(report, "example pruning")
    levels = [
        f"example pruning ({example_pruning})" if example_pruning not in (None, "none") else None,
        _token_pruning(model),
        _attention_sparsity(model),
    ]
    levels = [level for level in levels if level]
    patch_dropout = _patch_dropout(model)
    if not levels:
        if patch_dropout:  # not a Tri-Level level, but sparsity that ran: the card must not say "dense"
            return f"{patch_dropout}, with the three Tri-Level E-ViT levels off."
        return "Tri-Level E-ViT training with all three levels off (dense training)."
    return f"Tri-Level E-ViT training with {_join(levels + [patch_dropout] if patch_dropout else levels)}."


def _tost_sentence(model, report: TrainingReport) -> str:
    weight_sparsity = getattr(model.config, "weight_sparsity", None) or {}
    mask = ""
    if weight_sparsity.get("sparsity") is not None:
        mask = f" on a {100 * weight_sparsity['sparsity']:.3g} %-sparse weight mask ({weight_sparsity.get('method')})"
    rescaled_init = _setting(report, "rescaled init")
    label_smoothing = _setting(report, "label smoothing")
    techniques = [
        "ghost soft neurons" if _setting(report, "ghost soft neurons") else None,
        "ghost skip connections" if _setting(report, "ghost skip connections") else None,
        f"rescaled init ({rescaled_init})" if rescaled_init not in (None, "none") else None,
        f"label smoothing {label_smoothing:g}" if label_smoothing else None,
        _patch_dropout(model),  # a SparseViT trained with ToST may also drop patches
    ]
    techniques = [technique for technique in techniques if technique]
    if not techniques:
        return f"sparse training{mask} with none of ToST's techniques (vanilla sparse training)."
    return f"the ToST recipe for pruned networks{mask}, with {_join(techniques)}."


def method_sentence(model, report: TrainingReport) -> str:
    """The card's summary of how the model was trained: only the techniques that were on, read from the model's
    config (token and attention keep ratios, a non-default token selection, PatchDropout, `weight_sparsity`) and the
    report's settings."""
    if report.method == "tri_level":
        return _tri_level_sentence(model, report)
    if report.method == "tost":
        return _tost_sentence(model, report)
    if report.method == "dense":
        patch_dropout = _patch_dropout(model)
        return f"training with {patch_dropout}." if patch_dropout else DENSE_SENTENCE
    return f"{report.method}."


def sparsity_settings(model, report: TrainingReport | None) -> list[tuple[str, str]]:
    """The card's settings table: SparseViT's token and attention sparsity (a random token selection and PatchDropout
    only where they were on), the weight mask recorded in `config.weight_sparsity` (ToSTTrainer writes it), and the
    training method's settings, each label once (the first source wins)."""
    config = model.config
    rows = []
    if _is_sparse_vit(model):
        rows = [("token keep ratio", f"{config.token_keep_ratio:g}")]
        if config.token_keep_ratio < 1:  # the layers are the config's default even where no token is pruned
            rows.append(("token pruning layers", ", ".join(str(i) for i in config.token_pruning_layers) or "none"))
        if _random_token_selection(model):  # the default, CLS attention, goes unsaid
            rows.append(("token selection", "random (in training; evaluation ranks by CLS attention)"))
        rows += [
            ("token fusion", "on" if config.token_fusion else "off"),
            ("attention keep ratio", f"{config.attention_keep_ratio:g}"),
        ]
        patch_dropout_keep_ratio = _patch_dropout_keep_ratio(model)
        if patch_dropout_keep_ratio is not None:
            rows.append(("patch dropout keep ratio", f"{patch_dropout_keep_ratio:g} (training only)"))
    weight_sparsity = getattr(config, "weight_sparsity", None)
    if weight_sparsity:
        rows += [(f"weight mask {key.replace('_', ' ')}", str(value)) for key, value in weight_sparsity.items()]
    if report is not None:
        rows += [(key.replace("_", " "), str(value)) for key, value in report.settings.items()]
    unique: dict[str, str] = {}
    for name, value in rows:
        unique.setdefault(name, value)
    return list(unique.items())


def _architecture(model) -> str:
    config = model.config
    parameters = sum(parameter.numel() for parameter in model.parameters())
    if not _is_sparse_vit(model):
        return f"{type(model).__name__} (`{config.model_type}`), {parameters:,} parameters, {config.num_labels} labels."
    return (
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads, "
        f"MLP {config.intermediate_size}, image {config.image_size} with patch {config.patch_size} "
        f"({config.num_patches} patches), {config.num_channels} channel(s), {config.num_labels} labels"
        + (", DeiT distillation token" if config.use_distillation_token else "")
        + f"; {parameters:,} parameters."
    )


def build_model_card(
    model, report: TrainingReport | None, repo_id: str | None = None, has_processor: bool = False
) -> ModelCard:
    """Render the project's card for `model` (metadata: library, tags, pipeline tag, data set, base model, eval
    results; body: sparsity settings, measured accuracy and time, how to load it)."""
    report = report or TrainingReport()
    repo_id = repo_id or PLACEHOLDER_REPO_ID
    model_name = repo_id.split("/")[-1]
    sparse_vit = _is_sparse_vit(model)
    tags = ["hf_sparse", "sparse-vit" if sparse_vit else model.config.model_type, "vision", "image-classification"]
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
    return ModelCard.from_template(
        card_data,
        template_str=card_template(),
        model_name=model_name,
        model_kind="SparseViT" if sparse_vit else type(model).__name__,
        remote_code=sparse_vit,
        repo_id=repo_id,
        method_sentence=method_sentence(model, report),
        has_processor=has_processor,
        settings=sparsity_settings(model, report),
        results=results,
        time_note=(
            "Wall-clock is training time without evaluation, measured against a dense ViT trained with the same "
            "epochs and hyper-parameters on the same machine."
            if report.dense_train_seconds
            else None
        ),
        architecture=_architecture(model),
    )


def write_model_card(model, directory: str | os.PathLike, report: TrainingReport | None = None,
                     repo_id: str | None = None) -> None:
    """Write `hf_sparse_report.json` (when there is a report) and README.md (the card) into `directory`."""
    directory = Path(directory)
    if report is not None:
        report.write(directory)
    has_processor = (directory / "preprocessor_config.json").is_file()
    build_model_card(model, report, repo_id=repo_id, has_processor=has_processor).save(str(directory / "README.md"))


def save_for_hub(model, directory: str | os.PathLike, *, report: TrainingReport | None = None, image_processor=None,
                 repo_id: str | None = None, **save_kwargs) -> None:
    """A self-contained, Hub-ready folder: `model.save_pretrained` (weights, config, SparseViT's code), the image
    processor config, the training report and the card. A wrong argument type is a `TypeError` before anything is
    written; a card that fails otherwise (I/O) is logged, and the weights stay saved."""
    _check_push_arguments(model, repo_id, report, image_processor, repo_id_required=False)
    model.save_pretrained(directory, **save_kwargs)
    if image_processor is not None:
        image_processor.save_pretrained(directory)
    try:
        write_model_card(model, directory, report, repo_id=repo_id)
    except Exception as error:  # noqa: BLE001 - the card is a side artefact
        logger.warning("Could not write the model card into %s (%s: %s); the weights are saved.",
                       directory, type(error).__name__, error)


def _check_push_arguments(
    model, repo_id: Any, report: Any, image_processor: Any, repo_id_required: bool = True
) -> None:
    """Wrong types fail here, not as a logged card failure after the weights are saved or uploaded (`save_for_hub`
    takes no `repo_id`: `repo_id_required=False`)."""
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise TypeError(f"`model` must be a transformers model (with `save_pretrained`), got {type(model).__name__}.")
    if not isinstance(repo_id, str) and (repo_id_required or repo_id is not None):
        optional = "" if repo_id_required else " or None"
        raise TypeError(f"`repo_id` must be a str ('namespace/name'){optional}, got {type(repo_id).__name__}.")
    if report is not None and not isinstance(report, TrainingReport):
        raise TypeError(f"`report` must be a hf_sparse.TrainingReport or None, got {type(report).__name__}"
                        + (" (build one with `TrainingReport(**values)`)." if isinstance(report, dict) else "."))
    if image_processor is not None and not hasattr(image_processor, "save_pretrained"):
        raise TypeError("`image_processor` must be a transformers image processor (with `save_pretrained`) or None, "
                        f"got {type(image_processor).__name__}.")


def push_to_hub(model, repo_id: str, *, report: TrainingReport | None = None, image_processor=None,
                private: bool | None = None, token: str | None = None, commit_message: str | None = None,
                revision: str | None = None, create_pr: bool = False):
    """Publish `model` with its card: exactly what `save_for_hub` writes, in one commit (`model.push_to_hub` works
    too, with transformers' generic card). A wrong argument type is a `TypeError` before anything is uploaded."""
    _check_push_arguments(model, repo_id, report, image_processor)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as directory:
        save_for_hub(model, directory, report=report, image_processor=image_processor, repo_id=repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            commit_message=commit_message or f"Upload {type(model).__name__} with hf_sparse",
            revision=revision,
            create_pr=create_pr,
        )


def push_checkpoint(directory: str, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None):
    """`hf-sparse push`: publish a local model folder (a `save_pretrained` or Trainer output) with the card, built
    from its weights and its `hf_sparse_report.json`. The local folder is left as it is."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory!r} has no config.json: not a saved model folder.")
    model = AutoModelForImageClassification.from_pretrained(directory)
    processor = None
    if os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
        processor = AutoImageProcessor.from_pretrained(directory)
    return push_to_hub(model, repo_id, report=TrainingReport.read(directory), image_processor=processor,
                       private=private, token=token, commit_message=commit_message)
