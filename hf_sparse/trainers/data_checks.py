"""Checks of a classification data set against the model, before training starts: a missing labels column or a label
the classifier has no output for would otherwise fail at the first step, or halfway through an epoch."""

from __future__ import annotations

from typing import Any

LABEL_KEYS = ("labels", "label", "label_ids")  # what the Trainer's collators turn into `labels`


def _raw_dataset(dataset: Any) -> Any:
    """The data set under hf_sparse's index-adding wrapper."""
    return getattr(dataset, "dataset", dataset)


def _label_column(dataset: Any) -> str | None:
    features = getattr(dataset, "features", None) or {}
    return next((key for key in LABEL_KEYS if key in features), None)


def check_classification_dataset(dataset: Any, model: Any, name: str = "train_dataset") -> None:
    """Raise a `ValueError` naming the data set's columns and the model's `num_labels` when the examples carry no
    labels or a label is out of the classifier's range. Labels are read from the Arrow column when there is one
    (cheap even for large sets); otherwise the first example is checked."""
    dataset = _raw_dataset(dataset)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    try:
        first = dataset[0]
    except (IndexError, KeyError, TypeError):
        return  # an empty or non-indexable data set: the Trainer reports it
    if not isinstance(first, dict):
        return
    columns = list(getattr(dataset, "column_names", None) or first)
    if not any(key in first for key in LABEL_KEYS):
        raise ValueError(
            f"`{name}` gives examples with {sorted(first)} (columns {columns}) but no labels: the classifier needs a "
            f"`labels` (or `label`) entry. Add a label column, or make the transform return `labels`."
        )
    if not isinstance(num_labels, int) or num_labels < 2:
        return
    column = _label_column(dataset)
    feature = dataset.features[column] if column is not None else None
    feature_classes = getattr(feature, "num_classes", None)
    if feature_classes is not None and feature_classes > num_labels:
        raise ValueError(
            f"`{name}` column `{column}` is a ClassLabel with {feature_classes} classes but the model has "
            f"`num_labels`={num_labels}: build the model with num_labels={feature_classes} (and its id2label)."
        )
    if column is not None and hasattr(dataset, "with_format"):
        values = [value for value in dataset.with_format(None)[column] if value is not None]
    else:
        values = [next(int(first[key]) for key in LABEL_KEYS if key in first)] if _is_scalar_label(first) else []
    bad = sorted({int(value) for value in values if not 0 <= int(value) < num_labels})
    if bad:
        raise ValueError(
            f"`{name}` holds labels {bad[:5]} outside [0, {num_labels}) (the model's `num_labels`={num_labels}, "
            f"columns {columns}): build the model with the data set's number of classes."
        )


def _is_scalar_label(example: dict) -> bool:
    value = next(example[key] for key in LABEL_KEYS if key in example)
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return getattr(value, "ndim", 0) == 0
