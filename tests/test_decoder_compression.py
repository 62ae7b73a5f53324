"""Decoder language models end to end: a tiny Llama-family checkpoint compressed by `RMTKDCompressor` with the
`text-generation` task, reloaded with stock `AutoModelForCausalLM`, greedy generation unchanged by the reload."""
import json

import pytest
import torch
from _models import DECODER_VOCAB, counting_texts, save_tiny_decoder
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from optimum_rmtkd import RMTKDCompressor, RMTKDConfig

FAST = dict(batch_size=8, max_length=16, max_distillation_steps=2, width_multiple=4, min_width=4,
            estimator="mp-median", max_metric_drop=None, sites=("ffn", "heads", "hidden"))
VOCAB_SIZE = len(DECODER_VOCAB)


@pytest.fixture(scope="module")
def texts():
    return {"train": counting_texts(120, 0), "validation": counting_texts(40, 1)}


# (Qwen2's cut is covered in tests/adapters/test_llama.py: its Auto tokenizer class rebuilds a BPE tokenizer that
# this word-level test vocabulary does not survive.)
@pytest.mark.parametrize("family, tied", [("llama", False), ("mistral", True)])
def test_a_decoder_compresses_and_reloads_with_stock_transformers(tmp_path, texts, family, tied):
    source = save_tiny_decoder(tmp_path / "model", family, tied)
    compressor = RMTKDCompressor.from_pretrained(source)
    assert compressor.task.name == "text-generation"  # detected from `architectures`
    result = compressor.compress(texts["train"], texts["validation"], RMTKDConfig(**FAST),
                                 save_directory=tmp_path / "out")
    report = result.report
    assert report["task"] == "text-generation" and report["metric_name"] == "perplexity"
    assert report["metric_higher_is_better"] is False
    assert report["parameters"]["compressed"] < report["parameters"]["original"]
    assert {site["kind"] for site in report["sites"]} == {"ffn", "heads", "hidden"}

    out = tmp_path / "out"
    assert {"config.json", "generation_config.json", "tokenizer.json", "rmtkd_report.json"} <= {
        p.name for p in out.iterdir()}
    saved = json.loads((out / "config.json").read_text())
    assert saved["head_dim"] == 8 and saved["tie_word_embeddings"] is False  # a hidden cut unties the head
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(result.model)
    model = result.model.eval()
    batch = {"input_ids": torch.randint(3, VOCAB_SIZE, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    prompt = {"input_ids": torch.tensor([[1, 10, 11, 12]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(reloaded.generate(**prompt, **greedy), model.generate(**prompt, **greedy))

    # The model card follows the task: pipeline tag, metric and a generation snippet with the stock class.
    from optimum_rmtkd.hub import build_model_card

    card = build_model_card(out, repo_id="me/tiny-rmtkd")
    assert card.data.pipeline_tag == "text-generation" and card.data.metrics == ["perplexity"]
    assert "model = AutoModelForCausalLM.from_pretrained(\"me/tiny-rmtkd\")" in str(card)
    assert "output = model.generate(**inputs, max_new_tokens=20)" in str(card)


def test_per_layer_decoder_widths_reload_through_the_registered_type(tmp_path, texts):
    source = save_tiny_decoder(tmp_path / "model", "llama", False)
    result = RMTKDCompressor.from_pretrained(source).compress(
        texts["train"], texts["validation"], RMTKDConfig(**dict(FAST, sites=("ffn",)), output_format="per-layer"),
        save_directory=tmp_path / "out",
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "RMTKDLlamaForCausalLM"
    widths = [layer.mlp.down_proj.in_features for layer in reloaded.model.layers]
    assert widths == [site["kept_width"] for site in result.report["sites"]]
    batch = {"input_ids": torch.randint(3, VOCAB_SIZE, (2, 9))}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.model.eval()(**batch).logits, rtol=0, atol=0)


def test_a_config_without_architectures_gets_the_task_its_adapter_describes():
    # A GGUF file's config names no architecture: the Llama adapter covers `*ForCausalLM`, so text-generation.
    from transformers import BertConfig

    from optimum_rmtkd.compressor import default_task

    assert default_task(LlamaConfig()).name == "text-generation"
    assert default_task(MistralConfig(architectures=["MistralForCausalLM"])).name == "text-generation"
    assert default_task(BertConfig()).name == "text-classification"


def test_a_hidden_cut_that_would_grow_a_tied_model_is_skipped(tmp_path, texts):
    # A 2,000-row tied embedding and a mild cut, 48 → 36 (`min_width`): untying the head adds 2,000 × 36 parameters,
    # more than the cut saves, so the stage is skipped before anything is cut and the model stays tied.
    source = save_tiny_decoder(tmp_path / "model", "llama", tied=True, vocab_size=2000)
    result = RMTKDCompressor.from_pretrained(source).compress(
        texts["train"], texts["validation"], RMTKDConfig(**dict(FAST, sites=("hidden",), min_width=36)),
        save_directory=tmp_path / "out",
    )
    assert result.report["stages"][0]["widths"] == {"hidden": 36}
    (stage,) = result.report["stages"]
    assert stage["skipped"].startswith("the cut would leave ") and stage["skipped"].endswith(
        f"parameters, no fewer than the {result.report['parameters']['original']:,} now")
    assert stage["metric_after_distillation"] is None
    assert result.report["parameters"]["compressed"] == result.report["parameters"]["original"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
