"""The text recipes' built-in tiny models: ``tiny-bert`` (a sequence classifier) and
``tiny-llama`` (a causal LM), each with a tokenizer trained on the run's own training text, so
that a data file and one command are enough to try a recipe offline.

The tokenizers come from the `tokenizers` library: WordPiece with BERT's pre-tokenizer and
``[CLS] a [SEP] b [SEP]`` template for ``tiny-bert``; byte-level BPE (every string encodes, no
unknown token) for ``tiny-llama``. They are saved beside the final model, so ``pipeline()``
loads the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import NMSparsityConfigError

# preset name -> (model type, config kwargs); the vocabulary size is the tokenizer's.
TEXT_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-bert": (
        "bert",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
        ),
    ),
    "tiny-llama": (
        "llama",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    ),
}
VOCAB_SIZE = {"bert": 2000, "llama": 1000}


def check_text_preset(name: str, model_type: str) -> None:
    """Refuse a ``model_config`` that is not a built-in preset of ``model_type``."""
    known = [k for k, (kind, _) in TEXT_PRESETS.items() if kind == model_type]
    if name not in known:
        raise NMSparsityConfigError(
            f"model_config={name!r} is not a built-in model of this recipe; use "
            f"{', '.join(known)}, or --model_name_or_path for a pretrained model."
        )


def train_tokenizer(texts: Iterable[str], model_type: str):
    """A fast tokenizer trained on ``texts`` without the network: WordPiece for ``bert``,
    byte-level BPE for ``llama`` (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if model_type == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=VOCAB_SIZE["bert"], special_tokens=specials, show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
        return PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", **names)
    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE["llama"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_text_config(name: str, tokenizer, **kwargs):
    """The transformers config of preset ``name`` for ``tokenizer`` (its vocabulary size and
    special token ids), with ``kwargs`` (labels) on top."""
    from transformers import AutoConfig

    model_type, preset = TEXT_PRESETS[name]
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    ids = {k: v for k, v in ids.items() if v is not None}
    return AutoConfig.for_model(model_type, **preset, vocab_size=len(tokenizer), **ids, **kwargs)
