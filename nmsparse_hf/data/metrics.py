"""Evaluation metrics: the Trainer's ``compute_metrics`` from `evaluate` modules (accuracy and top-5
ship with the package in ``metric_scripts/`` and load offline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SHIPPED_METRICS = {
    "accuracy": "accuracy.py",
    "top5": "top5_accuracy.py",
    "top5_accuracy": "top5_accuracy.py",
}
METRICS_DIR = Path(__file__).resolve().parent / "metric_scripts"


def metric_path(name: str) -> str:
    """The path of a shipped metric module (``"accuracy"``, ``"top5"``), or ``name`` itself."""
    filename = SHIPPED_METRICS.get(name)
    return str(METRICS_DIR / filename) if filename else name


def make_compute_metrics(
    names: Sequence[str] = ("accuracy", "top5"),
) -> Callable[[Any], dict[str, float]]:
    """The Trainer's ``compute_metrics`` built from `evaluate` modules.

    ``"accuracy"`` and ``"top5"`` load the modules shipped in ``nmsparse_hf/metrics/`` by path
    (offline); any other name or path goes to ``evaluate.load`` as is (a Hub metric needs the
    Hub). The returned function takes an `EvalPrediction`: ``predictions`` are logits ``[N, C]``
    (the first element if a tuple), ``label_ids`` ints ``[N]`` or soft labels ``[N, C]`` (mixup),
    which are reduced by argmax. It returns ``{metric_name: value}``; the top-5 metric gets the
    five best classes by logit.
    """
    import evaluate

    metrics = {name: evaluate.load(metric_path(name), keep_in_memory=True) for name in names}

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions
        if isinstance(logits, tuple | list):
            logits = logits[0]
        logits = np.asarray(logits)
        labels = np.asarray(eval_pred.label_ids)
        if labels.ndim == 2:
            labels = labels.argmax(axis=-1)
        labels = labels.astype(np.int64)
        results: dict[str, float] = {}
        for name, metric in metrics.items():
            if SHIPPED_METRICS.get(name) == "top5_accuracy.py":
                k = min(5, logits.shape[-1])
                ranked = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
                out = metric.compute(predictions=ranked.tolist(), references=labels.tolist(), k=k)
            else:
                out = metric.compute(predictions=logits.argmax(axis=-1), references=labels)
            results.update({key: float(value) for key, value in out.items()})
        return results

    return compute_metrics
