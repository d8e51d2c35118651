"""Tiny text models of every preset family, built from configs (hidden 32, 2 layers, vocab 96),
random-token Trainer examples, and a word-level tokenizer that needs no download."""

from __future__ import annotations

import torch

VOCAB = 96
SEQ = 8

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)
_DECODER = dict(_COMMON, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
_DECODER_IDS = dict(bos_token_id=1, eos_token_id=2)
_T5 = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=16,
    d_ff=64,
    num_layers=2,
    num_heads=2,
    decoder_start_token_id=0,
)

# model_type -> (config class, model class, task, config kwargs)
FAMILIES: dict[str, tuple[str, str, str, dict]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", "cls", _COMMON),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", "cls", _COMMON),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        "cls",
        dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    ),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", "cls", _COMMON),
    "t5": ("T5Config", "T5ForConditionalGeneration", "seq2seq", _T5),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", "seq2seq", _T5),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "lm", dict(_DECODER, **_DECODER_IDS)),
    "mistral": ("MistralConfig", "MistralForCausalLM", "lm", dict(_DECODER, **_DECODER_IDS)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "lm", dict(_DECODER, **_DECODER_IDS)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "lm", dict(_DECODER, head_dim=16, **_DECODER_IDS)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "lm", dict(_DECODER, head_dim=16, **_DECODER_IDS)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        "lm",
        dict(_DECODER, head_dim=16, **_DECODER_IDS),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "lm", dict(_DECODER, **_DECODER_IDS)),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        "lm",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, **_DECODER_IDS),
    ),
}


def tiny_text_model(family: str, seed: int = 0, **overrides):
    """The tiny model of ``family`` (a key of `FAMILIES`), seeded."""
    import transformers

    config_cls, model_cls, _, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    return getattr(transformers, model_cls)(config)


class RandomTokens(torch.utils.data.Dataset):
    """``n`` seeded random token sequences as Trainer examples for ``task`` (cls, lm, seq2seq)."""

    def __init__(self, task: str, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.task = task
        self.ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
        self.targets = torch.randint(3, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long)}
        if self.task == "cls":
            item["labels"] = self.labels[i]
        elif self.task == "lm":
            item["labels"] = self.ids[i]
        else:
            item["labels"] = self.targets[i]
        return item


def example_inputs(task: str) -> dict[str, torch.Tensor]:
    """A fixed batch to compare logits before and after a save."""
    item = RandomTokens(task, n=2, seed=1)
    batch = {
        k: torch.stack([item[i][k] for i in range(2)]) for k in ("input_ids", "attention_mask")
    }
    if task == "seq2seq":
        batch["decoder_input_ids"] = item.targets[:2]
    return batch


def word_tokenizer(words: list[str] | None = None):
    """A word-level fast tokenizer over ``words`` (default: ``w0`` ... ``w89``), offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]", "[BOS]"]
    words = words if words is not None else [f"w{i}" for i in range(VOCAB - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
        bos_token="[BOS]",
    )
