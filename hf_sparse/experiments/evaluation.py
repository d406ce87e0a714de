"""`hf-sparse evaluate MODEL [MODEL ...]`: test accuracy and inference throughput of saved classifiers (a dense and a
sparse checkpoint, say) through `evaluate`'s image-classification evaluator, side by side on the same images.

Each model runs as a transformers `image-classification` pipeline with the image processor saved beside it (or, if
there is none, the data set's evaluation preprocessing); the metric is the accuracy module shipped with hf_sparse,
so nothing is fetched from the Hub. Throughput is the evaluator's (one image per pipeline call, the first model is
the reference of the ratios); run nothing else on the machine meanwhile.

The split must exist, except the default, "test": a data set without one (a flat image folder) is evaluated on the
part of train held out with `--seed` and `--held_out_fraction`, as training held it out. The pipeline feeds RGB; a
one-channel model gets the luma of it (the grey image it trained on), as SparseViT computes itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
from transformers import ImageClassificationPipeline

from ..metrics import load_accuracy
from ..models.sparse_vit.modeling_sparse_vit import LUMA_WEIGHTS
from ..validation import check_fraction, check_int
from .common import DataArguments, load_splits, local_folder


@dataclass
class EvaluateArguments:
    models: list[str] = field(metadata={"help": "Saved model folders (or Hub ids); the first is the reference."})
    dataset_name: str = field(default="fashion_mnist", metadata={"help": "'fashion_mnist', a Hub name or a folder."})
    split: str = field(default="test", metadata={"help": "The split to evaluate on; without a test split, 'test' is "
                       "the part of train held out with --seed and --held_out_fraction."})
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Evaluate on the first examples only."})
    seed: int = field(default=42, metadata={"help": "Without the split: the seed of the held-out split made from "
                      "train; use the training run's, or the models are scored on images they trained on."})
    held_out_fraction: float = field(default=0.1, metadata={"help": "Without the split: the held-out fraction."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: found by type)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: found by type)."})
    json: str | None = field(default=None, metadata={"help": "Also write the results as JSON here."})

    def __post_init__(self):
        if not self.models:
            raise ValueError("`models` must name at least one model folder or Hub id.")
        if self.max_eval_samples is not None:
            check_int("max_eval_samples", self.max_eval_samples, minimum=1)
        check_fraction("held_out_fraction", self.held_out_fraction, low_inclusive=False)
        for model in self.models:
            local_folder(model)  # a missing folder is said before any data set is loaded


ARGUMENTS = (EvaluateArguments,)


def evaluation_data(args: EvaluateArguments):
    data_args = DataArguments(dataset_name=args.dataset_name, eval_split=args.split, image_column=args.image_column,
                              label_column=args.label_column, held_out_fraction=args.held_out_fraction)
    _, data = load_splits(data_args, seed=args.seed, eval_split_flag="split")
    if args.max_eval_samples is not None:
        data = data.select(range(min(args.max_eval_samples, len(data))))
    return data


class LumaImageClassificationPipeline(ImageClassificationPipeline):
    """The image-classification pipeline for a one-channel model: transformers' pipeline converts every image to RGB,
    so the model gets the luma of the RGB pixels (PIL's "L" weights), which for a grey image is the image itself. The
    processor's per-channel normalisation must be the same on the three channels (it is linear, so normalising then
    taking the luma equals normalising the grey image)."""

    def preprocess(self, image, timeout=None):
        inputs = super().preprocess(image, timeout=timeout)
        pixel_values = inputs["pixel_values"]
        if pixel_values.shape[1] == 3:
            luma = pixel_values.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
            inputs["pixel_values"] = (pixel_values * luma).sum(dim=1, keepdim=True)
        return inputs


def _grey_processor_check(model_name: str, processor) -> None:
    for name in ("image_mean", "image_std"):
        values = getattr(processor, name, None)
        if isinstance(values, (list, tuple)) and len(set(values)) > 1:
            shown = ", ".join(f"{value:g}" for value in values)  # saved as float32: 0.1 reads 0.10000000149
            raise ValueError(f"{model_name} has num_channels=1 but its image processor's {name} differs per channel "
                             f"([{shown}]): give it one value repeated over the three channels.")


def _pipeline(model_name: str, data):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, image_processor_for

    model_name = local_folder(model_name) or model_name
    model = AutoModelForImageClassification.from_pretrained(model_name).eval()
    channels = getattr(model.config, "num_channels", 3)
    try:
        processor = AutoImageProcessor.from_pretrained(model_name)
    except OSError:  # no preprocessor_config.json: the data set's evaluation preprocessing
        size = data[0]["image"].size[0]
        mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if channels == 1 else ((0.5,) * 3, (0.5,) * 3)
        processor = image_processor_for(size, channels, mean, std)
    # SparseViT takes the luma of an RGB input itself; other one-channel models get it from the pipeline.
    grey = channels == 1 and model.config.model_type != "sparse_vit"
    if grey:
        _grey_processor_check(model_name, processor)
    pipeline_class = LumaImageClassificationPipeline if grey else ImageClassificationPipeline
    classifier = pipeline("image-classification", model=model, image_processor=processor, device=-1,
                          pipeline_class=pipeline_class)
    return classifier, model


def _evaluator():
    from evaluate.evaluator import ImageClassificationEvaluator

    class PipelineEvaluator(ImageClassificationEvaluator):
        def prepare_pipeline(self, model_or_pipeline, *args, **kwargs):
            # Our pipeline as it is: evaluate 0.4 checks for `transformers.TFPreTrainedModel`, gone in transformers 5.
            return model_or_pipeline

    return PipelineEvaluator()


def evaluate_models(args: EvaluateArguments) -> list[dict]:
    data = evaluation_data(args)
    names = data.features["label"].names
    task = _evaluator()
    rows = []
    for model_name in args.models:
        classifier, model = _pipeline(model_name, data)
        id2label = {int(key): value for key, value in model.config.id2label.items()}
        check_label_names(model_name, id2label, names, args.dataset_name)
        with torch.inference_mode():
            result = task.compute(
                model_or_pipeline=classifier, data=data, metric=load_accuracy(),
                label_mapping={label: names.index(label) for label in id2label.values()},  # the data set's ids
            )
        sparsity = getattr(model.config, "weight_sparsity", None)
        rows.append({
            "model": model_name,
            "examples": len(data),
            "type": model.config.model_type,
            "accuracy": result["accuracy"],
            "samples_per_second": result["samples_per_second"],
            "latency_in_seconds": result["latency_in_seconds"],
            "token_keep_ratio": getattr(model.config, "token_keep_ratio", None),
            "weight_sparsity": (sparsity or {}).get("sparsity"),
        })
    for row in rows:
        row["throughput_ratio"] = row["samples_per_second"] / rows[0]["samples_per_second"]
    return rows


def check_label_names(model_name: str, id2label: dict[int, str], names: list[str], dataset_name: str) -> None:
    """The model's labels must be the data set's names (predictions are matched to the data by name)."""
    if sorted(id2label.values()) == sorted(names):
        return
    hint = ""
    if all(label == f"LABEL_{index}" for index, label in id2label.items()):
        hint = (" Its labels are transformers' defaults (LABEL_0, ...): set `config.id2label` (and `label2id`) to the "
                "data set's class names, e.g. `model.config.id2label = dict(enumerate(names))`, and save it again.")
    raise ValueError(f"{model_name} predicts {sorted(id2label.values())} but {dataset_name!r} has the labels "
                     f"{sorted(names)}.{hint}")


def format_table(rows: list[dict], examples: int) -> str:
    lines = [f"{examples} test images, one per pipeline call, CPU threads {torch.get_num_threads()}",
             f"{'model':<40} {'type':<11} {'accuracy %':>10} {'images/s':>9} {'x first':>8}"]
    for row in rows:
        lines.append(f"{row['model'][-40:]:<40} {row['type']:<11} {100 * row['accuracy']:>10.2f} "
                     f"{row['samples_per_second']:>9.1f} {row['throughput_ratio']:>8.3f}")
    return "\n".join(lines)


def main(args: EvaluateArguments) -> list[dict]:
    rows = evaluate_models(args)
    print(format_table(rows, rows[0]["examples"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"arguments": asdict(args), "rows": rows}, handle, indent=2)
    return rows
