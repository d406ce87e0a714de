"""Metrics shipped with hf_sparse as `evaluate` modules (loadable offline)."""

from __future__ import annotations

from importlib import resources


def load_accuracy():
    """`evaluate`'s accuracy metric, from the module shipped in this package (no Hub access)."""
    import evaluate

    return evaluate.load(str(resources.files("hf_sparse.metrics").joinpath("accuracy.py")))


__all__ = ["load_accuracy"]
