"""GGUF input: a tiny Llama written with `gguf.GGUFWriter` (F32 tensors, a sentencepiece-style vocabulary) loads
through `RMTKDCompressor.from_pretrained` and `rmtkd analyze` as the model it was written from.

The file is written the way llama.cpp's `convert_hf_to_gguf.py` writes a Llama: llama.cpp tensor names, q/k rows
permuted to its rotary layout (transformers' loader un-permutes them), the config as `llama.*` metadata and the
tokenizer as `tokenizer.ggml.*` metadata. F32 tensors are read back bit for bit, so weights and logits are compared
exactly.
"""
from __future__ import annotations

import contextlib
import csv
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

gguf = pytest.importorskip("gguf")

from optimum_rmtkd import RMTKDCompressor, RMTKDConfig  # noqa: E402
from optimum_rmtkd.commands.rmtkd_cli import main  # noqa: E402
from optimum_rmtkd.rmt import ESTIMATORS  # noqa: E402

from conftest import kept_package_logging  # noqa: E402

# Words built from a few letters; the vocabulary holds each letter, "▁" and every "▁"-prefix of every word, so the
# merges transformers derives from it (`generate_merges`) build each word from its letters one at a time.
WORDS = ("the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "red", "hat", "sun", "hot", "is", "in")
SPECIALS = ("<unk>", "<s>", "</s>")
UNK, BOS, EOS = 0, 1, 2
# llama.cpp's token types: 1 normal, 2 unknown, 3 control (added as a special token by the loader).
TOKEN_TYPES = {"<unk>": 2, "<s>": 3, "</s>": 3}
# Powers of two and integers are exact in the float32 metadata GGUF stores, so the loaded config equals the source's.
RMS_NORM_EPS = 2.0 ** -17
ROPE_THETA = 10000.0


def vocabulary() -> list:
    letters = sorted({letter for word in WORDS for letter in word})
    prefixes = ["▁"] + [f"▁{word[:end]}" for word in WORDS for end in range(1, len(word) + 1)]
    return list(SPECIALS) + letters + list(dict.fromkeys(prefixes))


TOKENS = vocabulary()


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(TOKENS), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=RMS_NORM_EPS, rope_theta=ROPE_THETA,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (`LlamaModel.permute` in convert_hf_to_gguf.py): within each head, the two rotary
    halves interleaved. transformers' `LlamaTensorProcessor._reverse_permute_weights` undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """Write `model` and the `TOKENS` vocabulary as llama.cpp would, with every tensor in F32."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")  # not "mistral": the loader reads a llama named so as Mistral
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_vocab_size(len(TOKENS))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # A sentencepiece ("llama") vocabulary: tokens, scores and types; the loader derives the merges.
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([-float(index) for index in range(len(TOKENS))])
    writer.add_token_types([TOKEN_TYPES.get(token, 1) for token in TOKENS])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    # Tensors under llama.cpp's names (the map transformers inverts to load them), output.weight included: untied.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        name, suffix = hf_name.rsplit(".", 1)
        weight = tensor.numpy()
        if name.endswith("q_proj"):
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        elif name.endswith("k_proj"):
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(name)}.{suffix}", np.ascontiguousarray(weight, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def source() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def gguf_path(source, tmp_path_factory) -> Path:
    return write_gguf(source, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def token_ids(*words: str) -> list:
    return [TOKENS.index(f"▁{word}") for word in words]


SAMPLE = torch.tensor([[BOS, *token_ids("the", "big", "cat", "sat", "on", "a", "red", "mat")]])


def logits(model, input_ids=SAMPLE) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _check_loaded(compressor, source, path):
    model = compressor.model
    assert type(model) is LlamaForCausalLM
    assert compressor.task.name == "text-generation"
    assert compressor.source == str(path)
    assert not compressor.head_is_new  # the file holds output.weight: the head is the model's own
    loaded, expected = model.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.float32, name
        assert torch.equal(loaded[name], tensor), name
    # F32 weights in, the same config: the same computation, bit for bit.
    assert torch.equal(logits(model), logits(source))
    tokenizer = compressor.preprocessor
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == SPECIALS[1:] + SPECIALS[:1]
    # The llama vocabulary type adds BOS (llama.cpp's default for it).
    assert tokenizer("the big cat sat on a red mat")["input_ids"] == SAMPLE[0].tolist()


def test_from_pretrained_loads_a_gguf_file(gguf_path, source):
    compressor = RMTKDCompressor.from_pretrained(gguf_path)
    _check_loaded(compressor, source, gguf_path)


def test_from_pretrained_loads_gguf_file_in_a_folder(gguf_path, source):
    compressor = RMTKDCompressor.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _check_loaded(compressor, source, gguf_path)


def test_a_model_loaded_from_gguf_saves_and_reloads_with_stock_from_pretrained(gguf_path, source, tmp_path):
    compressor = RMTKDCompressor.from_pretrained(gguf_path)
    compressor.model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(reloaded) is LlamaForCausalLM
    assert torch.equal(logits(reloaded.eval()), logits(source))


@pytest.fixture(scope="module")
def texts_csv(tmp_path_factory) -> Path:
    """60 short sentences of the tiny vocabulary's words, in a `text` column."""
    rng = random.Random(0)
    texts = tmp_path_factory.mktemp("data") / "texts.csv"
    with texts.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        for _ in range(60):
            writer.writerow([" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))])
    return texts


@pytest.fixture(scope="module")
def analyze_output(gguf_path, texts_csv) -> dict:
    """`rmtkd analyze tiny.gguf --dataset texts.csv --quiet` in-process, once: its exit status, stdout and stderr."""
    argv = ["analyze", str(gguf_path), "--dataset", str(texts_csv), "--max-length", "16", "--sites", "ffn", "--quiet"]
    out, err = io.StringIO(), io.StringIO()
    with kept_package_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return {"status": status, "out": out.getvalue(), "err": err.getvalue()}


def test_cli_analyze_takes_a_gguf_file(analyze_output):
    assert analyze_output["status"] == 0
    lines = analyze_output["out"].splitlines()
    chosen = RMTKDConfig().estimator
    assert lines[0].split() == ["site", "d", "n", "q", "σ²", "λ₊",
                                *(f"{name}*" if name == chosen else name for name in ESTIMATORS), "KS", "heavy-tailed"]
    # `--sites ffn`: one row per layer's MLP, at its full width of 37 channels.
    assert [line.split()[:2] for line in lines[2:4]] == [["model.layers.0.mlp", "37"], ["model.layers.1.mlp", "37"]]


def test_cli_analyze_of_a_gguf_file_is_quiet(gguf_path, texts_csv):
    # In a process of its own, as a user runs it: tqdm reads TQDM_DISABLE when first imported, and transformers'
    # GGUF loader draws its bar with plain tqdm, which only that variable silences.
    import subprocess
    import sys

    argv = ["analyze", str(gguf_path), "--dataset", str(texts_csv), "--max-length", "16", "--sites", "ffn", "--quiet"]
    code = f"from optimum_rmtkd.commands.rmtkd_cli import main; raise SystemExit(main({argv!r}))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("site")
    assert run.stderr == ""
