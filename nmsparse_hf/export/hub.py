"""Push a verified sparse checkpoint to the Hugging Face Hub."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from .checkpoint import verify_checkpoint
from .weights import WeightFiles

# Files that travel with a model besides its weights: config, card, generation settings and the
# processor / tokenizer files `save_pretrained` of an image processor, tokenizer or processor
# writes (so that `pipeline()` loads the repository).
MODEL_FILES = ("config.json", "README.md", "generation_config.json")
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Files of an earlier upload to the same repository that a model push replaces: weights in any
# format, their indices, and Trainer checkpoints (dense master weights). Deleted in the push's
# own commit unless re-uploaded, so no stale dense file stays under the sparse model's name.
STALE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "last-checkpoint/*",
    "checkpoint-*/*",
)


def upload_files(folder: str | os.PathLike) -> list[str]:
    """The files of a checkpoint directory that make up the model: its config, card, the weight
    files ``from_pretrained`` loads (`WeightFiles`, index included) and the processor or
    tokenizer files beside them. Anything else (training state, logs, other checkpoints,
    notes) stays local."""
    folder = Path(folder)
    weights = WeightFiles(folder)
    names = [*MODEL_FILES, *PROCESSOR_FILES, *weights.files]
    if weights.index:
        names.append(weights.index)
    return sorted({n for n in names if (folder / n).is_file()})


def push_sparse_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    blocking: bool = True,
    api: Any = None,
    delete_stale: bool = True,
):
    """Upload a sparse checkpoint directory to the Hugging Face Hub, whoever wrote it.

    Verifies the checkpoint first (`verify_checkpoint`: a failing or unreadable one is not
    pushed), creates the model repo if needed (``exist_ok``) and uploads, in one commit, the
    files `upload_files` lists: the model with its processor or tokenizer files, nothing else.
    The same commit deletes the repository's other weight files and Trainer checkpoint folders
    (`STALE_PATTERNS`), so an earlier dense upload cannot outlive the sparse model.

    Args:
        folder: the checkpoint directory.
        repo_id: ``"user/name"`` of the model repository.
        token, private, revision, commit_message, create_pr: as in ``HfApi``.
        blocking: ``False`` returns a future (``run_as_future``) instead of waiting.
        api: an ``HfApi`` to use (default: a new one with ``token``).
        delete_stale: delete the stale files of `STALE_PATTERNS` in the same commit.

    Returns:
        What ``upload_folder`` returns (a ``CommitInfo``, or a future when not ``blocking``).

    Raises:
        NMVerificationError: the checkpoint does not verify. NMCheckpointError: it cannot be read.
    """
    folder = Path(folder)
    verify_checkpoint(folder).raise_if_failed()
    files = upload_files(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    extra = {} if blocking else {"run_as_future": True}
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        allow_patterns=[glob.escape(name) for name in files],
        commit_message=commit_message or "Upload N:M-sparse model (nmsparse_hf)",
        revision=revision,
        create_pr=create_pr,
        delete_patterns=list(STALE_PATTERNS) if delete_stale else None,
        **extra,
    )
