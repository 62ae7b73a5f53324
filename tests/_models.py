"""Tiny random models saved as `from_pretrained` folders, for tests that need a model on disk.

Sizes are deliberately odd (hidden 32, 4 heads, FFN 37, 2 layers, vocabulary of 100) so that a shape bug cannot
hide behind a coincidence of equal dimensions. Nothing is downloaded: configs, weights and tokenizers are built here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    ConvNextImageProcessorPil,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ResNetConfig,
    ResNetForImageClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

PathLike = Union[str, os.PathLike]

VOCAB_SIZE = 100
NUM_LABELS = 3
# Special tokens, the 26 lower-case letters, then filler word pieces up to VOCAB_SIZE entries.
_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_VOCAB = _SPECIAL_TOKENS + [chr(c) for c in range(ord("a"), ord("z") + 1)]
_VOCAB += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
_VOCAB += [f"w{i}" for i in range(VOCAB_SIZE - len(_VOCAB))]


def _save_tokenizer(path: Path) -> None:
    # transformers 5 builds the WordPiece model from `vocab` (a dict or a vocab.txt path) and writes vocab.txt itself.
    BertTokenizerFast(vocab={token: i for i, token in enumerate(_VOCAB)}).save_pretrained(path)


def save_tiny_bert(path: PathLike, model_type: str = "bert", seed: int = 0, intermediate_size: int = 37) -> Path:
    """Build a tiny random `bert`, `roberta` or `distilbert` sequence classifier and save it with a tokenizer.

    `intermediate_size` sets the FFN width, so a test can build a narrower "compressed" twin.

    RoBERTa reuses the WordPiece tokenizer: a byte-level BPE needs all 256 byte symbols, more than the tiny
    vocabulary, and the tests only need a tokenizer that `AutoTokenizer.from_pretrained` reloads.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if model_type == "bert":
        config = BertConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, num_attention_heads=4, intermediate_size=intermediate_size,
            num_hidden_layers=2, max_position_embeddings=64, num_labels=NUM_LABELS,
        )
        model = BertForSequenceClassification(config)
    elif model_type == "roberta":
        # RoBERTa offsets positions by `pad_token_id + 1`, so 64 usable positions need 66 embeddings.
        config = RobertaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, num_attention_heads=4, intermediate_size=intermediate_size,
            num_hidden_layers=2, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, num_labels=NUM_LABELS,
        )
        model = RobertaForSequenceClassification(config)
    elif model_type == "distilbert":
        config = DistilBertConfig(
            vocab_size=VOCAB_SIZE, dim=32, n_heads=4, hidden_dim=intermediate_size, n_layers=2,
            max_position_embeddings=64, num_labels=NUM_LABELS,
        )
        model = DistilBertForSequenceClassification(config)
    else:
        raise ValueError(f"`model_type` must be one of 'bert', 'roberta', 'distilbert', got {model_type!r}.")
    model.eval().save_pretrained(path)
    _save_tokenizer(path)
    return path


def save_tiny_resnet(path: PathLike, layer_type: str = "basic", seed: int = 0) -> Path:
    """Build a tiny random `ResNetForImageClassification` (two stages, odd widths) and save it with a processor."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # Bottleneck blocks divide their width by 4, so their stage widths must be multiples of 4.
    hidden_sizes = [12, 20] if layer_type == "basic" else [16, 28]
    config = ResNetConfig(
        num_channels=3, embedding_size=12, hidden_sizes=hidden_sizes, depths=[1, 1], layer_type=layer_type,
        num_labels=NUM_LABELS,
    )
    model = ResNetForImageClassification(config)
    model.eval().save_pretrained(path)
    # The PIL processor needs no torchvision; `AutoImageProcessor` reloads it from `preprocessor_config.json`.
    processor = ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0)
    processor.save_pretrained(path)
    return path


# --- decoders -------------------------------------------------------------------------------------------------------
DECODER_VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(40)}}


def decoder_tokenizer():
    """A whitespace word-level tokenizer over `DECODER_VOCAB` with BOS/EOS (EOS doubles as padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(DECODER_VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def save_tiny_decoder(path: PathLike, family: str = "llama", tied: bool = False, vocab_size: int = 0) -> Path:
    """A tiny Llama or Mistral with odd sizes: hidden 48, FFN 37, 6 heads of 8 in 2 key/value groups, 2 layers; the
    embedding has `vocab_size` rows (default: the tokenizer's)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    path = Path(path)
    torch.manual_seed(0)
    sizes = dict(vocab_size=vocab_size or len(DECODER_VOCAB), hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=tied)
    config, cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (MistralConfig, MistralForCausalLM)
    cls(config(**sizes)).save_pretrained(path)
    decoder_tokenizer().save_pretrained(path)
    return path


def counting_texts(n: int, seed: int):
    """Runs of consecutive words (`w7 w8 w9 …`): a next-token rule a tiny decoder learns in a few steps."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start, length = torch.randint(0, 25, (1,), generator=g).item(), torch.randint(4, 15, (1,), generator=g).item()
        rows.append({"text": " ".join(f"w{i}" for i in range(start, start + length))})
    return datasets.Dataset.from_list(rows)
