"""Causal LMs to ONNX with a key/value cache: ONNX Runtime against PyTorch with and without a past, greedy generation
token for token, the generation driver, the prefill/decode benchmark and the CLI, on tiny random decoders."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import counting_texts, save_tiny_decoder
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from optimum_rmtkd import RMTKDCompressor, RMTKDConfig  # noqa: E402
from optimum_rmtkd.benchmark import benchmark_models  # noqa: E402
from optimum_rmtkd.exporters.generation import ONNXCausalLM, generate_onnx  # noqa: E402
from optimum_rmtkd.exporters.onnx import (  # noqa: E402
    RMTKDValidationError,
    check_onnx_generation,
    export_onnx,
    validate_onnx,
)
from optimum_rmtkd.modeling.kv_cache import cache_shapes  # noqa: E402

BIN = Path(sys.executable).parent
PROMPTS = ["w1 w2 w3 w4", "w7"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny untied Llama (6 heads in 2 key/value groups) and its export."""
    folder = save_tiny_decoder(tmp_path_factory.mktemp("llama") / "model")
    result = export_onnx(folder, folder / "onnx")
    return folder, result


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny tied Mistral with per-layer FFN and head counts (the registered per-layer type) and its export."""
    root = tmp_path_factory.mktemp("mistral")
    source = save_tiny_decoder(root / "model", "mistral", tied=True)
    config = RMTKDConfig(batch_size=8, max_length=16, max_distillation_steps=1, width_multiple=4, min_width=4,
                         estimator="mp-median", max_metric_drop=None, sites=("ffn", "heads"), output_format="per-layer")
    RMTKDCompressor.from_pretrained(source).compress(counting_texts(80, 0), counting_texts(24, 1), config,
                                                     save_directory=root / "out")
    return source, root / "out", export_onnx(root / "out", root / "out" / "onnx")


def _graph_io(onnx_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return ({i.name: i.shape for i in session.get_inputs()}, [o.name for o in session.get_outputs()])


def test_the_graph_takes_and_returns_the_cache_in_optimums_layout(llama):
    folder, result = llama
    inputs, outputs = _graph_io(result.onnx_path)
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 8]
    # Validated at two shapes, each without a cache (prefill) and with one (decode), and by a greedy generation.
    assert set(result.max_abs_diff) == {"2x16", "2x16+past9", "3x37", "3x37+past19"}
    assert max(result.max_abs_diff.values()) < 1e-5 and result.passed and result.generation_checked
    exported = {path.name for path in result.onnx_path.parent.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= exported
    config = json.loads((result.onnx_path.parent / "config.json").read_text())
    assert config["head_dim"] == 8 and config["use_cache"] is True


def test_onnx_runtime_matches_pytorch_step_by_step_with_a_cache(llama):
    folder, result = llama
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    decoder = ONNXCausalLM.from_file(result.onnx_path)
    ids = np.array([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    mask = np.ones_like(ids)
    logits, past = decoder.step(ids[:, :3], mask[:, :3], decoder.empty_past(2))
    logits, past = decoder.step(ids[:, 3:], mask, past)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits[:, 3:].numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    assert past["past_key_values.0.key"].shape == (2, 2, 5, 8)


def test_the_io_bound_decode_loop_equals_plain_steps(llama):
    # `decode` keeps each step's cache as device `OrtValue`s (I/O binding); `step` goes through NumPy every time.
    _, result = llama
    decoder = ONNXCausalLM.from_file(result.onnx_path)
    prompt = np.array([[0, 1, 5, 6], [1, 9, 10, 11]])
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])  # left-padded first row
    logits, past = decoder.step(prompt, mask, decoder.empty_past(2))
    next_ids = logits[:, -1:].argmax(axis=-1)
    fed = decoder.decode(next_ids, mask, past, steps=6)
    expected, step_ids, step_mask = [], next_ids, mask
    for _ in range(6):
        step_mask = np.concatenate([step_mask, np.ones((2, 1), np.int64)], axis=1)
        expected.append(step_ids)
        logits, past = decoder.step(step_ids, step_mask, past)
        step_ids = logits[:, -1:].argmax(axis=-1)
    assert fed.shape == (2, 6)
    np.testing.assert_array_equal(fed, np.concatenate(expected, axis=1))


def test_generate_onnx_equals_generate_token_for_token(llama):
    folder, result = llama
    output = generate_onnx(result.onnx_path.parent, PROMPTS, max_new_tokens=12)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = model.generate(**tokenizer(PROMPTS, return_tensors="pt", padding=True), do_sample=False,
                              max_new_tokens=12)
    np.testing.assert_array_equal(output.sequences, expected.numpy())
    prompt_length = expected.shape[1] - 12
    assert output.texts == tokenizer.batch_decode(expected[:, prompt_length:], skip_special_tokens=True)
    single = generate_onnx(result.onnx_path.parent, PROMPTS[0], max_new_tokens=5)
    assert single.sequences.shape == (1, 4 + 5) and len(single.texts) == 1  # no BOS added by this tokenizer


def test_per_layer_widths_export_with_each_layers_cache(compressed):
    source, out, result = compressed
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs, _ = _graph_io(result.onnx_path)
    shapes = cache_shapes(model)
    for layer, shape in enumerate(shapes):
        assert inputs[f"past_key_values.{layer}.key"] == ["batch_size", shape.key[0], "past_sequence_length",
                                                           shape.key[1]]
    assert json.loads((result.onnx_path.parent / "config.json").read_text())["head_dim"] == 8
    assert result.generation_checked and max(result.max_abs_diff.values()) < 1e-4
    original = AutoModelForCausalLM.from_pretrained(source)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters())


def test_another_models_graph_fails_validation_and_the_generation_check(llama, tmp_path):
    folder, result = llama
    other = AutoModelForCausalLM.from_pretrained(save_tiny_decoder(tmp_path / "other", "mistral")).eval()
    torch.manual_seed(1)
    for parameter in other.parameters():  # same shapes, other weights
        parameter.data.normal_(0, 0.5)
    with pytest.raises(RMTKDValidationError, match="outputs differ by max"):
        validate_onnx(result.onnx_path, other)
    with pytest.raises(RMTKDValidationError, match="greedy generation differs at new token 0"):
        check_onnx_generation(result.onnx_path, other, atol=1e-4)


def test_generation_driver_errors(llama, tmp_path, bert_dir):
    folder, result = llama
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive int"):
        generate_onnx(result.onnx_path.parent, "w1", max_new_tokens=0)
    with pytest.raises(ValueError, match="holds no model.onnx; export the model first"):
        generate_onnx(tmp_path, "w1")
    with pytest.raises(ValueError, match="`prompt` must be a non-empty string"):
        generate_onnx(result.onnx_path.parent, "")
    classifier = export_onnx(bert_dir, tmp_path / "bert-onnx", validate=False)
    with pytest.raises(ValueError, match="takes no key/value cache"):
        ONNXCausalLM.from_file(classifier.onnx_path)


def test_decoder_benchmark_times_prefill_and_decode(llama, compressed, tmp_path):
    pytest.importorskip("matplotlib")
    folder, _ = llama
    _, out, _ = compressed
    report = benchmark_models(folder, out, backends=("pytorch", "onnxruntime-cpu"), batch_sizes=(1, 2),
                              sequence_lengths=(8,), new_tokens=3, warmup=1, repeats=2, energy_seconds=0.01,
                              output_dir=tmp_path / "bench")
    assert report.settings["new_tokens"] == 3
    cells = {(r.backend, r.phase, r.batch_size, r.model) for r in report.results}
    assert len(cells) == len(report.results) == 2 * 2 * 2 * 2
    for row in report.results:
        tokens = row.batch_size * (8 if row.phase == "prefill" else 3)
        assert row.throughput == pytest.approx(tokens / row.median_ms * 1e3)
    for name in ("original", "compressed"):
        assert set(report.models[name]["flops_per_decode_step"]) == {"8"}
        assert report.models[name]["flops_per_decode_step"]["8"] < report.models[name]["flops_per_example"]["8"]
    decode = report.speedup_for("onnxruntime-cpu", 1, 8, phase="decode")
    flops = {name: report.models[name]["flops_per_decode_step"]["8"] for name in ("original", "compressed")}
    assert decode.flop_ratio == pytest.approx(flops["original"] / flops["compressed"])
    assert report.speedup_for("onnxruntime-cpu", 1, 8) is None  # a generative cell always has a phase
    saved = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert {row["phase"] for row in saved["results"]} == {"prefill", "decode"}
    markdown = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "| onnxruntime-cpu | decode | 1 | 8 |" in markdown and "throughput tok/s" in markdown
    assert "GFLOPs / decode step after 8 tokens" in markdown
    assert (tmp_path / "bench" / "benchmark.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"plus `new_tokens` \(60\) must not exceed the original model's limit"):
        benchmark_models(folder, out, backends=("pytorch",), sequence_lengths=(8,), new_tokens=60)


def test_rmtkd_export_and_benchmark_on_decoder_folders(llama, compressed, tmp_path):
    folder, _ = llama
    _, out, _ = compressed
    export = subprocess.run([str(BIN / "rmtkd"), "export", str(folder), str(tmp_path / "onnx"), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    assert "Greedy generation with ONNX Runtime gives PyTorch's tokens" in export.stdout
    bench = subprocess.run([str(BIN / "rmtkd"), "benchmark", "--original", str(folder), "--compressed", str(out),
                            "--backends", "onnxruntime-cpu", "--batch-sizes", "1", "--sequence-lengths", "4",
                            "--new-tokens", "2", "--warmup", "0", "--repeats", "2", "--energy-seconds", "0.01",
                            "--quiet"], capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    assert "| onnxruntime-cpu | prefill | 1 | 4 |" in bench.stdout
    assert "| onnxruntime-cpu | decode | 1 | 4 |" in bench.stdout


def test_the_model_cards_onnx_snippet_generates_with_plain_onnxruntime(compressed, monkeypatch, capsys):
    import huggingface_hub

    from optimum_rmtkd.hub import build_model_card

    _, out, result = compressed
    card = str(build_model_card(out, repo_id=str(out)))
    assert "pipeline_tag: text-generation" in card and "perplexity" in card
    code = card.split("### ONNX", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "past_key_values." in code and "onnxruntime.InferenceSession" in code
    # Run it as a user would, the Hub download answered by the local folder.
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(out))
    exec(compile(code, "model_card_onnx_snippet", "exec"), {})
    printed = capsys.readouterr().out.strip()
    # The library's driver stops at EOS, the snippet runs its 20 steps: the snippet's text starts with the driver's.
    prompt_length = len(AutoTokenizer.from_pretrained(out)("The capital of France is")["input_ids"])
    expected = generate_onnx(out / "onnx", "The capital of France is", max_new_tokens=20).sequences[0, prompt_length:]
    assert printed.startswith(AutoTokenizer.from_pretrained(out).decode(expected).strip())
