"""The model card (README.md) of a sparse checkpoint: Hub metadata (front matter written by
`huggingface_hub.ModelCardData`: pipeline tag, base model, datasets, license, tags, model-index)
and a body from ``templates/model_card.md``.

Rendering only: every input (the metadata, the verification report, the architectures) is an
argument, and nothing here reads a checkpoint or writes a file; `export.checkpoint` writes the
card (`write_model_card`) as part of the one save path."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..sparsifier import VerificationReport
from .metadata import SparseCheckpointMetadata

TAGS = ["nmsparse", "nmsparse_hf", "n:m-sparsity", "sparse"]
# Eval entries that are bookkeeping, not quality: left out of the model-index.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch")
# Suffixes of model class names and the pipeline task they serve (when transformers' own
# table does not list the class, e.g. custom code).
_TASK_SUFFIXES = {
    "ForImageClassification": "image-classification",
    "ForCausalLM": "text-generation",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
    "ForConditionalGeneration": "text2text-generation",
    "ForAudioClassification": "audio-classification",
    "ForObjectDetection": "object-detection",
}


def infer_pipeline_tag(architectures: Sequence[str] | None) -> str | None:
    """The Hub pipeline tag of a model from its ``config.architectures`` (e.g.
    ``ViTForImageClassification`` -> ``image-classification``, ``LlamaForCausalLM`` ->
    ``text-generation``), or ``None`` when no task fits (a bare backbone)."""
    names = list(architectures or [])
    try:
        from transformers.modelcard import TASK_MAPPING

        for name in names:
            for task, mapping in TASK_MAPPING.items():
                if name in mapping.values():
                    return task
    except ImportError:  # pragma: no cover - transformers is a dependency of the export path
        pass
    for name in names:
        for suffix, task in _TASK_SUFFIXES.items():
            if name.endswith(suffix):
                return task
    return None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    elif isinstance(value, list | tuple):
        value = ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _listify(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [v for v in value if v]


def quality_metrics(eval_results: Mapping[str, Any] | None) -> dict[str, float]:
    """``{metric: value}`` of the numeric eval results, without the ``eval_`` prefix and without
    bookkeeping entries (runtime, samples per second, epoch)."""
    out: dict[str, float] = {}
    for key, value in (eval_results or {}).items():
        name = str(key).removeprefix("eval_")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not name.endswith(_NOT_METRICS):
            out[name] = float(value)
    return out


def card_metadata(
    meta: SparseCheckpointMetadata,
    *,
    model_name: str,
    model_type: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
    pipeline_tag: str | None = None,
    finetuned_from: str | None = None,
    dataset: str | None = None,
    dataset_tags: str | Sequence[str] | None = None,
    license: str | None = None,
    tags: str | Sequence[str] | None = None,
):
    """The card's `huggingface_hub.ModelCardData`: library, pipeline tag, base model, datasets
    (``dataset_tags``: Hub ids), license (``other`` when unknown), tags (ours, each N:M pattern,
    the recipe, the model type, the task, ``tags``), metric names and a model-index with the
    quality metrics of ``eval_results`` on ``dataset`` (default: the first Hub id)."""
    from huggingface_hub import EvalResult, ModelCardData

    patterns = [f"{p[0]}:{p[1]}" for p in meta.locations.values()]
    tag_list = [*TAGS, *(f"{p}-sparsity" for p in patterns)]
    start = meta.one_shot
    if start is not None:
        tag_list += ["one-shot", f"one-shot-{start['method']}"]
    if start is None or start["trained"]:  # a recipe tag only for a model it trained
        tag_list.append(meta.recipe.lower())
    tag_list += [t for t in (model_type, pipeline_tag) if t] + _listify(tags)
    datasets = _listify(dataset_tags)
    dataset = dataset or (datasets[0] if datasets else None)
    scores = quality_metrics(eval_results)
    results = None
    if scores and dataset and pipeline_tag:
        results = [
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=datasets[0] if datasets else "-".join(dataset.lower().split()),
                dataset_name=dataset,
                metric_type=name,
                metric_value=round(value, 6),
                metric_name=name,
            )
            for name, value in scores.items()
        ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        base_model=finetuned_from,
        datasets=datasets or None,
        license=license or "other",
        tags=list(dict.fromkeys(tag_list)),
        metrics=[n for n in scores if n != "loss"] or None,
        model_name=model_name if results else None,
        eval_results=results,
    )


def render_model_card(
    meta: SparseCheckpointMetadata,
    report: VerificationReport,
    eval_results: Mapping[str, Any] | None = None,
    model_name: str = "N:M-sparse model",
    model_type: str | None = None,
    *,
    architectures: Sequence[str] | None = None,
    pipeline_tag: str | None = None,
    finetuned_from: str | None = None,
    dataset: str | None = None,
    dataset_tags: str | Sequence[str] | None = None,
    license: str | None = None,
    tags: str | Sequence[str] | None = None,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    training: Mapping[str, Any] | None = None,
) -> str:
    """The README.md of a sparse checkpoint: front matter (`card_metadata`) and the body of
    ``templates/model_card.md``.

    ``meta`` is the checkpoint's `SparseCheckpointMetadata`, ``report`` the verification of the saved weights
    (one row per layer block, with on-disk names). ``pipeline_tag`` defaults to the task of
    ``architectures`` (`infer_pipeline_tag`); ``finetuned_from`` (or ``base_model``, the Hub
    card's name) is the base model's Hub id or path; ``dataset`` names the evaluation data for
    the model-index; ``dataset_tags`` (or ``datasets``) lists Hub dataset ids; ``tags`` are added
    to ours. These names are those of `Trainer.create_model_card`. ``training`` adds rows to the
    card's training table, e.g. how the run was distributed (``{"distributed mode": "DDP",
    "processes": 2}``).
    """
    pipeline_tag = pipeline_tag or infer_pipeline_tag(architectures)
    finetuned_from = finetuned_from or base_model
    dataset_tags = dataset_tags or datasets
    data = card_metadata(
        meta,
        model_name=model_name,
        model_type=model_type,
        eval_results=eval_results,
        pipeline_tag=pipeline_tag,
        finetuned_from=finetuned_from,
        dataset=dataset,
        dataset_tags=dataset_tags,
        license=license,
        tags=tags,
    )
    template = (
        resources.files("nmsparse_hf.export").joinpath("templates/model_card.md").read_text("utf-8")
    )
    repo_hint = model_name if model_name.count("/") == 1 else "path/to/checkpoint"
    return string.Template(template).substitute(
        front_matter=data.to_yaml(),
        model_name=model_name,
        what=_what(pipeline_tag, finetuned_from),
        usage=_usage(pipeline_tag, repo_hint),
        **_body_tables(meta, report, eval_results, training),
        library_version=meta.library_version or "?",
        format=meta.format,
    )


def _origin(meta: SparseCheckpointMetadata) -> str:
    """How the sparse weights came to be, for the card's first paragraph."""
    trained = f"trained with nmsparse_hf (recipe: {meta.recipe})"
    start = meta.one_shot
    if start is None:
        return trained
    calib = (
        f", {start['samples']} calibration samples, {start['tokens']} tokens"
        if start["samples"]
        else ""
    )
    pruned = f"pruned one-shot by nmsparse_hf ({start['method']}{calib})"
    return f"{pruned}, then {trained}" if start["trained"] else f"{pruned}, not trained after"


def _what(pipeline_tag: str | None, finetuned_from: str | None) -> str:
    article = "An" if (pipeline_tag or "").startswith(tuple("aeiou")) else "A"
    kind = f"{article} {pipeline_tag} model" if pipeline_tag else "A model"
    if finetuned_from:
        kind += f" fine-tuned from [{finetuned_from}]({_base_link(finetuned_from)})"
    return kind


def _base_link(base: str) -> str:
    return (
        f"https://huggingface.co/{base}"
        if base.count("/") == 1 and not Path(base).exists()
        else base
    )


def _usage(pipeline_tag: str | None, repo_hint: str) -> str:
    lines = [
        "from transformers import AutoConfig" + (", pipeline" if pipeline_tag else ", AutoModel"),
        "",
    ]
    if pipeline_tag:
        lines.append(f'pipe = pipeline("{pipeline_tag}", model="{repo_hint}")')
    else:
        lines.append(f'model = AutoModel.from_pretrained("{repo_hint}")')
    lines.append(
        f'print(AutoConfig.from_pretrained("{repo_hint}").nm_sparsity["locations"])'
        "  # N:M pattern of each location"
    )
    return "\n".join(lines)


def _body_tables(
    meta: SparseCheckpointMetadata,
    report: VerificationReport,
    eval_results: Mapping[str, Any] | None,
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    location_rows = [
        f"| {loc} | {info.pattern[0]}:{info.pattern[1]} | {info.blocks} | {info.sparsity:.4f} |"
        for loc, info in meta.location_sparsity.items()
    ]
    layer_rows = [
        f"| `{c.name}` | {c.location} | {c.pattern[0]}:{c.pattern[1]} | "
        f"{'x'.join(map(str, c.shape))} | {c.sparsity:.4f} |"
        for c in report.layers
    ]
    settings = {**meta.config, **(training or {})}
    recipe_rows = [f"| {_cell(k)} | {_cell(v)} |" for k, v in settings.items() if v is not None]
    if eval_results:
        eval_section = "| metric | value |\n|---|---|\n" + "\n".join(
            f"| {_cell(k)} | {_cell(v)} |" for k, v in eval_results.items()
        )
    else:
        eval_section = "No evaluation results were recorded."
    dim_words = (
        "input dimension of each weight (`row`)"
        if meta.sparse_dim == "row"
        else "output dimension of each weight (`col`)"
    )
    return dict(
        origin=_origin(meta),
        dim_words=dim_words,
        sparse_dim=meta.sparse_dim,
        achieved=f"{meta.achieved_sparsity:.4f}",
        nonzeros=meta.nonzeros,
        numel=meta.numel,
        location_rows="\n".join(location_rows),
        num_layers=len(report.layers),
        layer_rows="\n".join(layer_rows),
        recipe_rows="\n".join(recipe_rows),
        eval_section=eval_section,
    )
