"""Top-k accuracy (default k=5) as an `evaluate` metric module, loadable offline by path.

``evaluate.load("/path/to/nmsparse_hf/metrics/top5_accuracy.py")`` (evaluate takes the module name
from the file name). Inputs: ``predictions``, for each example its class ids ranked best first
(at least ``k`` of them, e.g. ``np.argsort(-logits)[:, :5]``), and ``references``, the true class
id. Output: ``{"top5_accuracy": fraction whose reference is among the first k predictions}``
(the key names the k used: ``top{k}_accuracy``).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of examples whose reference class is among the k best-ranked predictions."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): class ids ranked best first, at least k per example.
    references (list of int): true class ids.
    k (int): how many of the ranked predictions count, default 5.
Returns:
    top{k}_accuracy (float): in [0, 1].
Example:
    >>> metric = evaluate.load("nmsparse_hf/metrics/top5_accuracy.py")
    >>> metric.compute(predictions=[[3, 1, 0, 2, 4], [0, 1, 2, 3, 4]], references=[4, 5])
    {'top5_accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Top5Accuracy(evaluate.Metric):
    """Top-k accuracy over ranked class ids."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=5):
        if len(references) == 0:
            raise ValueError("top5_accuracy: no examples; pass at least one prediction/reference.")
        shortest = min(len(p) for p in predictions)
        if shortest < k:
            raise ValueError(
                f"top5_accuracy: k={k} but an example has only {shortest} ranked predictions; "
                f"pass at least k class ids per example (np.argsort(-logits)[:, :{k}])."
            )
        ranked = np.asarray([list(p)[:k] for p in predictions])
        references = np.asarray(references)[:, None]
        return {f"top{k}_accuracy": float((ranked == references).any(axis=1).mean())}
