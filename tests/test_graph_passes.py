"""The 3-D `Attention` rewrite: same numbers, fewer nodes, and no rewrite when the pattern is not exact."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimum_rmtkd.exporters.graph_passes import fold_attention_head_transposes

HEADS, HEAD_DIM = 3, 4
WIDTH = HEADS * HEAD_DIM


def attention_graph(heads_in_shape: int = -1, extra_output: bool = False) -> onnx.ModelProto:
    """Q, K, V [batch, seq, WIDTH] split into heads, the 4-D `Attention`, merged back, as torch's exporter writes it."""
    nodes, initializers = [], [
        numpy_helper.from_array(np.array([0, 0, heads_in_shape, HEAD_DIM], dtype=np.int64), "split_shape"),
        numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "merge_shape"),
    ]
    for name in ("q", "k", "v"):
        nodes.append(helper.make_node("Reshape", [name, "split_shape"], [f"{name}_4d"]))
        nodes.append(helper.make_node("Transpose", [f"{name}_4d"], [f"{name}_heads"], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Attention", ["q_heads", "k_heads", "v_heads", "mask"], ["attn"], scale=0.5))
    nodes.append(helper.make_node("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Reshape", ["attn_t", "merge_shape"], ["merged"]))
    nodes.append(helper.make_node("Relu", ["merged"], ["out"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", WIDTH]) for n in ("q", "k", "v")]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["b", 1, "s", "s"]))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", WIDTH])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("q_4d", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["out"], feed)[0]


@pytest.mark.parametrize("heads_in_shape", [-1, HEADS])
def test_fold_keeps_the_numbers_and_drops_the_transposes(heads_in_shape):
    model = attention_graph(heads_in_shape)
    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal((2, 5, WIDTH)).astype(np.float32) for name in ("q", "k", "v")}
    mask = np.ones((2, 1, 5, 5), dtype=bool)
    mask[1, :, :, 3:] = False  # a padded second row
    feed["mask"] = mask
    expected = run(model, feed)

    folded = copy.deepcopy(model)
    assert fold_attention_head_transposes(folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    assert [node.op_type for node in folded.graph.node] == ["Attention", "Relu"]
    attention = folded.graph.node[0]
    assert list(attention.input) == ["q", "k", "v", "mask"] and list(attention.output) == ["merged"]
    attributes = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert attributes["q_num_heads"] == attributes["kv_num_heads"] == HEADS
    assert not folded.graph.initializer  # the reshape targets went with their reshapes
    np.testing.assert_allclose(run(folded, feed), expected, rtol=0, atol=1e-6)


def test_fold_leaves_an_intermediate_that_is_read_elsewhere():
    model = attention_graph(extra_output=True)
    before = model.SerializeToString()
    assert fold_attention_head_transposes(model) == 0
    assert model.SerializeToString() == before


def test_fold_needs_a_known_head_count():
    model = attention_graph()
    del model.graph.input[0].type.tensor_type.shape.dim[:]  # q's width unknown: -1 heads cannot be resolved
    assert fold_attention_head_transposes(model) == 0
