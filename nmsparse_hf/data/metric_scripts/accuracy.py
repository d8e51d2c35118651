"""Top-1 accuracy as an `evaluate` metric module, loadable offline by path.

``evaluate.load("/path/to/nmsparse_hf/metrics/accuracy.py")`` (evaluate takes the module name from
the file name). Inputs: ``predictions`` and ``references``, one int class id per example.
Output: ``{"accuracy": fraction of predictions equal to their reference}``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of examples whose predicted class id equals the reference class id."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids (argmax of the logits).
    references (list of int): true class ids.
Returns:
    accuracy (float): in [0, 1].
Example:
    >>> metric = evaluate.load("nmsparse_hf/metrics/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Top-1 accuracy over int class ids."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if len(references) == 0:
            raise ValueError("accuracy: no examples; pass at least one prediction/reference pair.")
        return {"accuracy": float((predictions == references).mean())}
