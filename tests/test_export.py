"""ONNX export: the optimum folder layout, dynamic axes, validation against PyTorch, and every refusal."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _models import NUM_LABELS, save_tiny_bert, save_tiny_resnet
from onnx import numpy_helper
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from optimum_rmtkd.exporters.onnx import (
    CPU_DISABLED_OPTIMIZERS,
    DEFAULT_OPSET,
    MIN_OPSET,
    ONNXExportResult,
    RMTKDValidationError,
    _convert_to_fp16,
    export_onnx,
    load_saved_model,
    ort_session_options,
    validate_onnx,
)
from optimum_rmtkd.saving import save_compressed_model

# Inputs of each graph, as optimum's ONNX configs name them: RoBERTa's single segment type drops token_type_ids.
EXPECTED_INPUTS = {
    "bert": ["input_ids", "attention_mask", "token_type_ids"],
    "roberta": ["input_ids", "attention_mask"],
    "distilbert": ["input_ids", "attention_mask"],
    "resnet": ["pixel_values"],
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {name: save_tiny_bert(root / name, name) for name in ("bert", "roberta", "distilbert")}
    dirs["resnet"] = save_tiny_resnet(root / "resnet")
    return dirs


@pytest.fixture(scope="module")
def bert_export(model_dirs, tmp_path_factory):
    return export_onnx(model_dirs["bert"], tmp_path_factory.mktemp("exports") / "bert-onnx")


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "resnet"])
def test_export_writes_optimum_layout_and_validates(name, model_dirs, tmp_path):
    output_dir = tmp_path / "onnx"
    result = export_onnx(model_dirs[name], output_dir)

    assert isinstance(result, ONNXExportResult)
    assert result.onnx_path == output_dir / "model.onnx"
    assert result.passed is True and result.opset == DEFAULT_OPSET == 23 and result.atol == 1e-4
    # float32 graph against float32 PyTorch: only summation-order rounding, far below the 1e-4 tolerance.
    assert set(result.max_abs_diff) == {"2x16", "3x37"}
    assert all(0 <= diff < 1e-4 for diff in result.max_abs_diff.values())

    files = {path.name for path in output_dir.iterdir()}
    processor_files = {"preprocessor_config.json"} if name == "resnet" else {"tokenizer.json", "tokenizer_config.json"}
    assert {"model.onnx", "config.json"} | processor_files <= files
    assert "model.safetensors" not in files
    assert AutoConfig.from_pretrained(output_dir).model_type == name
    if name == "resnet":
        AutoImageProcessor.from_pretrained(output_dir)
    else:
        AutoTokenizer.from_pretrained(output_dir)

    model = onnx.load(str(result.onnx_path))
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 23
    # Opset 23 exports attention as the fused `Attention` op (one per layer), not as MatMul/Softmax/Where.
    config = AutoConfig.from_pretrained(output_dir)
    attention_ops = [node for node in model.graph.node if node.op_type == "Attention"]
    assert len(attention_ops) == (0 if name == "resnet" else config.num_hidden_layers)
    # ...read in the 3-D layout: no head transposes left around it (`graph_passes`).
    assert not any(node.op_type == "Transpose" for node in model.graph.node)
    for node in attention_ops:
        heads = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["q_num_heads"]
        assert heads == config.num_attention_heads
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == EXPECTED_INPUTS[name]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    # Dynamic axes are symbolic names, not the traced sizes.
    if name == "resnet":
        assert session.get_inputs()[0].shape == ["batch_size", 3, "height", "width"]
        feed = {"pixel_values": np.zeros((5, 3, 23, 23), dtype=np.float32)}
    else:
        assert all(i.shape == ["batch_size", "sequence_length"] for i in session.get_inputs())
        feed = {i.name: np.ones((5, 7), dtype=np.int64) for i in session.get_inputs()}
    assert session.run(None, feed)[0].shape == (5, NUM_LABELS)


def test_validation_fails_on_a_corrupted_graph(bert_export, model_dirs, tmp_path):
    model = onnx.load(str(bert_export.onnx_path))
    # Scale the classifier's weight: the graph stays well-formed, only its answers change. (A shift of the
    # embeddings would not do: the LayerNorm after them removes any constant offset.)
    target = next(tensor for tensor in model.graph.initializer if tensor.name == "classifier.weight")
    corrupted = numpy_helper.to_array(target) * 2.0
    target.CopyFrom(numpy_helper.from_array(corrupted.astype(np.float32), target.name))
    corrupted_path = tmp_path / "corrupted.onnx"
    onnx.save(model, str(corrupted_path))

    with pytest.raises(RMTKDValidationError, match=r"max \|Δ\| = .* above `atol` = 1\.0e-04"):
        validate_onnx(corrupted_path, model_dirs["bert"], atol=1e-4)
    # The untouched export still passes, at other shapes and without padding too.
    folder = bert_export.onnx_path.parent
    diffs = validate_onnx(folder, model_dirs["bert"], shapes=((1, 5), (4, 64)), with_padding=False)
    assert set(diffs) == {"1x5", "4x64"}


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("truncated", "Unable to parse proto"), ("dangling-input", "Nodes in a graph must be topologically sorted")],
)
def test_validation_fails_on_a_malformed_file(damage, reason, bert_export, model_dirs, tmp_path):
    broken_path = tmp_path / "broken.onnx"
    if damage == "truncated":
        data = bert_export.onnx_path.read_bytes()
        broken_path.write_bytes(data[: len(data) // 2])  # a copy cut short: not a parseable protobuf
    else:
        model = onnx.load(str(bert_export.onnx_path))
        model.graph.node[-1].input[0] = "no_such_tensor"  # the last node reads a value nothing produces
        onnx.save(model, str(broken_path))
    message = rf"^`onnx.checker` rejects '.*broken\.onnx' \({reason}.*\); the file is damaged .*export again\.$"
    with pytest.raises(RMTKDValidationError, match=message):
        validate_onnx(broken_path, model_dirs["bert"])


def test_failed_validation_leaves_no_folder(model_dirs, tmp_path):
    output_dir = tmp_path / "onnx"
    # ResNet's float32 convolutions differ from PyTorch's by ~1e-7, so a 1e-12 tolerance must fail.
    with pytest.raises(RMTKDValidationError, match=r"above `atol` = 1\.0e-12"):
        export_onnx(model_dirs["resnet"], output_dir, atol=1e-12)
    assert not output_dir.exists()
    assert not list(tmp_path.iterdir())


def test_graph_optimization_writes_optimized_file(model_dirs, tmp_path):
    output_dir = tmp_path / "onnx"
    result = export_onnx(model_dirs["distilbert"], output_dir, optimization_level="extended")
    assert result.onnx_path == output_dir / "model_optimized.onnx"
    assert (output_dir / "model.onnx").is_file() and result.onnx_path.is_file()
    # Extended level fuses LayerNorm and GELU into ONNX Runtime's contrib ops.
    domains = {node.domain for node in onnx.load(str(result.onnx_path)).graph.node}
    assert "com.microsoft" in domains
    assert all(diff < 1e-4 for diff in result.max_abs_diff.values())


def _optimized_op_types(onnx_path, options, tmp_path) -> set[str]:
    options.optimized_model_filepath = str(tmp_path / "session-optimized.onnx")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def test_cpu_session_options_leave_skip_layer_norm_unfused(bert_export, model_dirs, tmp_path):
    assert CPU_DISABLED_OPTIMIZERS == ("SkipLayerNormFusion",)
    stock = _optimized_op_types(bert_export.onnx_path, ort_session_options("cpu", ()), tmp_path)
    assert "SkipLayerNormalization" in stock
    recommended = _optimized_op_types(bert_export.onnx_path, ort_session_options("cpu"), tmp_path)
    assert "SkipLayerNormalization" not in recommended and "LayerNormalization" in recommended
    # Only the one rewrite is off: the other fusions of the default level still apply.
    assert "BiasGelu" in recommended or "Gelu" in recommended

    # The export's own ahead-of-time optimisation uses the same options, and still matches PyTorch.
    result = export_onnx(model_dirs["bert"], tmp_path / "optimized", optimization_level="extended")
    op_types = {node.op_type for node in onnx.load(str(result.onnx_path)).graph.node}
    assert "SkipLayerNormalization" not in op_types and "LayerNormalization" in op_types
    assert all(diff < 1e-4 for diff in result.max_abs_diff.values())


def test_session_options_per_device_and_refusals(bert_export, tmp_path):
    # CUDA options can be built without a GPU; they keep the fusion, whose slowness was measured on the CPU kernel.
    assert "SkipLayerNormalization" in _optimized_op_types(bert_export.onnx_path, ort_session_options("cuda"), tmp_path)
    options = ort_session_options("cpu", ["SkipLayerNormFusion", "BiasGeluFusion"])
    assert options.get_session_config_entry("optimization.disable_specified_optimizers") == (
        "SkipLayerNormFusion;BiasGeluFusion"
    )
    assert "BiasGelu" not in _optimized_op_types(bert_export.onnx_path, options, tmp_path)
    for names in ("SkipLayerNormFusion", ["a;b"], [""], [3]):
        with pytest.raises(ValueError, match=r"sequence of ONNX Runtime graph transformer names"):
            ort_session_options("cpu", names)
    with pytest.raises(ValueError, match=r"`device` must be one of \('cpu', 'cuda'\), got 'tpu'"):
        ort_session_options("tpu")


def test_fp16_conversion_keeps_float32_io(bert_export, tmp_path):
    # export_onnx refuses fp16 on CPU; the conversion itself runs here on the CPU provider's fallbacks.
    fp16_path = tmp_path / "model_fp16.onnx"
    _convert_to_fp16(bert_export.onnx_path, fp16_path)
    onnx.checker.check_model(str(fp16_path))
    reference = ort.InferenceSession(str(bert_export.onnx_path), providers=["CPUExecutionProvider"])
    half = ort.InferenceSession(str(fp16_path), providers=["CPUExecutionProvider"])
    feed = {i.name: np.random.default_rng(0).integers(0, 100, (2, 9)) for i in reference.get_inputs()}
    feed["token_type_ids"] = np.zeros((2, 9), dtype=np.int64)
    expected, actual = reference.run(None, feed)[0], half.run(None, feed)[0]
    assert actual.dtype == np.float32
    # float16 keeps ~11 bits of mantissa: logits of size ~1 agree to ~1e-3.
    np.testing.assert_allclose(actual, expected, atol=1e-2)


def test_output_dir_must_not_be_or_contain_input(model_dirs):
    message = r"`output_dir` .* is the input model .*, one of its parents or a folder inside it; .*choose another"
    with pytest.raises(ValueError, match=message):
        export_onnx(model_dirs["bert"], model_dirs["bert"])
    with pytest.raises(ValueError, match=message):
        export_onnx(model_dirs["bert"], model_dirs["bert"].parent, overwrite=True)


def test_lowest_opset_still_exports_and_validates(model_dirs, tmp_path):
    result = export_onnx(model_dirs["bert"], tmp_path / "onnx", opset=MIN_OPSET)
    assert result.passed is True and result.opset == 18
    model = onnx.load(str(result.onnx_path))
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 18
    # Below opset 23 attention is lowered to primitive ops.
    assert not any(node.op_type == "Attention" for node in model.graph.node)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 17}, r"`opset` must be at least 18 .*got 17"),
        ({"optimization_level": "max"}, r"`optimization_level` must be None or one of .*got 'max'"),
        ({"fp16": True}, r"`fp16=True` needs `device='cuda'`, got `device`='cpu'"),
        ({"device": "tpu"}, r"`device` must be one of \('cpu', 'cuda'\), got 'tpu'"),
        ({"atol": 0.0}, r"`atol` must be positive, got 0.0"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message, model_dirs, tmp_path):
    with pytest.raises(ValueError, match=message):
        export_onnx(model_dirs["bert"], tmp_path / "onnx", **kwargs)


def test_opset_type_and_missing_config(tmp_path, model_dirs):
    with pytest.raises(TypeError, match=r"`opset` must be an int, got str"):
        export_onnx(model_dirs["bert"], tmp_path / "onnx", opset="18")
    with pytest.raises(ValueError, match=r"`model_dir` .* has no config.json"):
        export_onnx(tmp_path, tmp_path / "onnx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_cuda_device_needs_a_gpu(model_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"`device`='cuda' needs a GPU visible to PyTorch"):
        export_onnx(model_dirs["bert"], tmp_path / "onnx", device="cuda")


def test_existing_output_needs_overwrite(bert_export, model_dirs):
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_onnx(model_dirs["bert"], bert_export.onnx_path.parent)


def test_load_saved_model_picks_the_tasks_auto_class(model_dirs):
    assert type(load_saved_model(model_dirs["resnet"])).__name__ == "ResNetForImageClassification"
    bert = load_saved_model(model_dirs["bert"])
    assert type(bert).__name__ == "BertForSequenceClassification" and not bert.training
    assert next(bert.parameters()).dtype == torch.float32


def test_export_of_a_registered_per_layer_type(model_dirs, tmp_path):
    # A compressed model saved in the per-layer format: `rmtkd_bert`, layer 0 with a 16-wide FFN, layer 1 with 37.
    from optimum_rmtkd.modeling import per_layer_classes_for

    config_class, model_class = per_layer_classes_for("bert")
    config = config_class(
        vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2,
        max_position_embeddings=64, num_labels=NUM_LABELS, per_layer_config={0: {"intermediate_size": 16}},
    )
    model_dir = tmp_path / "rmtkd-bert"
    # Written as the compressor writes it: config with `auto_map`, and the remote-code file beside the weights.
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["bert"])
    save_compressed_model(model_class(config).eval(), tokenizer, model_dir, "per-layer")

    result = export_onnx(model_dir, tmp_path / "onnx")
    assert result.passed and all(diff < 1e-4 for diff in result.max_abs_diff.values())
    assert AutoConfig.from_pretrained(tmp_path / "onnx", trust_remote_code=True).model_type == "rmtkd_bert"
    assert {"modeling_rmtkd.py", "tokenizer.json"} <= {path.name for path in (tmp_path / "onnx").iterdir()}
    # The FFN matrices keep their per-layer widths in the graph (the exporter may store them transposed).
    ffn_shapes = sorted(
        tuple(tensor.dims)
        for tensor in onnx.load(str(result.onnx_path)).graph.initializer
        if len(tensor.dims) == 2 and ({16, 37} & set(tensor.dims))
    )
    assert ffn_shapes == [(16, 32), (32, 16), (32, 37), (37, 32)]


def test_rotation_cut_model_exports_and_validates(model_dirs, tmp_path):
    # The registered per-layer type with `RotatedLayerNorm`s (hidden_cut="rotation") exports with plain ONNX ops and
    # matches PyTorch; the exported config keeps the registered type so the folder says what it holds.
    from optimum_rmtkd.adapters import get_adapter
    from optimum_rmtkd.calibration import collect_statistics
    from optimum_rmtkd.configuration import RMTKDConfig
    from optimum_rmtkd.modeling.per_layer import as_registered_type
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"]).eval()
    adapter = get_adapter(model)
    hidden = adapter.sites(model)[0]
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 100, (4, 9), generator=g), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
               for _ in range(2)]
    stats = collect_statistics(model, batches, adapter.required_captures([hidden]))
    config = RMTKDConfig(hidden_cut="rotation", output_format="per-layer")
    model = as_registered_type(adapter.reduce(model, [hidden], {"hidden": 16}, stats, config))
    save_compressed_model(model, None, tmp_path / "rotated", "per-layer")
    result = export_onnx(tmp_path / "rotated", tmp_path / "onnx")
    assert result.passed and all(diff < 1e-4 for diff in result.max_abs_diff.values())
    assert AutoConfig.from_pretrained(tmp_path / "onnx").rotated_layer_norm_dim == 32
