"""Accuracy as an `evaluate` metric module shipped with hf_sparse, so `evaluate.load` works offline.

`evaluate.load("accuracy")` fetches a script from the Hub; `hf_sparse.metrics.load_accuracy()` loads this file by
path instead. Self-contained: `evaluate` imports it on its own.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to the references."
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): ground-truth labels.
    normalize (`bool`, defaults to True): the fraction (True) or the count (False) of correct predictions.
Returns:
    accuracy (`float`): the fraction (or count) of correct predictions.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, normalize=True):
        correct = np.asarray(predictions) == np.asarray(references)
        return {"accuracy": float(correct.mean() if normalize else correct.sum())}
