"""`hf-sparse evaluate MODEL [MODEL ...]`: test accuracy and inference throughput of saved classifiers (a dense and a
sparse checkpoint, say) through `evaluate`'s image-classification evaluator, side by side on the same images.

Each model runs as a transformers `image-classification` pipeline with the image processor saved beside it (or, if
there is none, the data set's evaluation preprocessing); the metric is the accuracy module shipped with hf_sparse,
so nothing is fetched from the Hub. Throughput is the evaluator's (one image per pipeline call, the first model is
the reference of the ratios); run nothing else on the machine meanwhile.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from ..metrics import load_accuracy
from .common import DataArguments, load_splits


@dataclass
class EvaluateArguments:
    models: list[str] = field(metadata={"help": "Saved model folders (or Hub ids); the first is the reference."})
    dataset_name: str = field(default="fashion_mnist", metadata={"help": "'fashion_mnist', a Hub name or a folder."})
    split: str = field(default="test", metadata={"help": "The split to evaluate on."})
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Evaluate on the first examples only."})
    seed: int = field(default=42, metadata={"help": "Without the split: the seed of the held-out split made from "
                      "train; use the training run's, or the models are scored on images they trained on."})
    held_out_fraction: float = field(default=0.1, metadata={"help": "Without the split: the held-out fraction."})
    json: str | None = field(default=None, metadata={"help": "Also write the results as JSON here."})

    def __post_init__(self):
        if not self.models:
            raise ValueError("`models` must name at least one model folder or Hub id.")


ARGUMENTS = (EvaluateArguments,)


def evaluation_data(args: EvaluateArguments):
    _, data = load_splits(DataArguments(dataset_name=args.dataset_name, eval_split=args.split,
                                        held_out_fraction=args.held_out_fraction), seed=args.seed)
    if args.max_eval_samples is not None:
        data = data.select(range(min(args.max_eval_samples, len(data))))
    return data


def _pipeline(model_name: str, data):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, image_processor_for

    model = AutoModelForImageClassification.from_pretrained(model_name).eval()
    if getattr(model.config, "num_channels", 3) == 1 and model.config.model_type != "sparse_vit":
        raise ValueError(
            f"{model_name} has num_channels=1, but transformers' image pipeline feeds RGB images: train it with "
            "num_channels=3 (a grey image repeated), or, for a ViT, convert it to SparseViT (`hf-sparse convert`), "
            "which takes the luma of an RGB input."
        )
    try:
        processor = AutoImageProcessor.from_pretrained(model_name)
    except OSError:  # no preprocessor_config.json: the data set's evaluation preprocessing
        size = data[0]["image"].size[0]
        channels = getattr(model.config, "num_channels", 3)
        mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if channels == 1 else ((0.5,) * 3, (0.5,) * 3)
        processor = image_processor_for(size, channels, mean, std)
    return pipeline("image-classification", model=model, image_processor=processor, device=-1), model


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
        if sorted(id2label.values()) != sorted(names):
            raise ValueError(f"{model_name} predicts {sorted(id2label.values())} but `{args.dataset_name}` has the "
                             f"labels {sorted(names)}.")
        with torch.inference_mode():
            result = task.compute(
                model_or_pipeline=classifier, data=data, metric=load_accuracy(),
                label_mapping={label: names.index(label) for label in id2label.values()},  # the data set's ids
            )
        sparsity = getattr(model.config, "weight_sparsity", None)
        rows.append({
            "model": model_name,
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


def format_table(rows: list[dict], examples: int) -> str:
    lines = [f"{examples} test images, one per pipeline call, CPU threads {torch.get_num_threads()}",
             f"{'model':<40} {'type':<11} {'accuracy %':>10} {'images/s':>9} {'x first':>8}"]
    for row in rows:
        lines.append(f"{row['model'][-40:]:<40} {row['type']:<11} {100 * row['accuracy']:>10.2f} "
                     f"{row['samples_per_second']:>9.1f} {row['throughput_ratio']:>8.3f}")
    return "\n".join(lines)


def main(args: EvaluateArguments) -> list[dict]:
    rows = evaluate_models(args)
    examples = len(evaluation_data(args))
    print(format_table(rows, examples))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"arguments": asdict(args), "rows": rows}, handle, indent=2)
    return rows
