"""CPU lowering: the bias fold into MatMulIntegerToFloat (graphs built in code, then a compiled artifact), and
the GELU bias fusion inside every timestep-group branch."""

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from ditq_compiler.exporters.lowering import LayerRecord
from ditq_compiler.exporters.lowering.cpu_kernels import FoldBiasIntoIntegerGemm
from ditq_compiler.exporters.ort_inspect import _all_nodes

K, N, TOKENS = 16, 24, 5
RNG = np.random.default_rng(0)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _linear(x_dq, weight, out, *, bias=None, int32_bias=False, tag=""):
    """MatMul(x_dq, DQ(weight, axis=1)) [-> Add(bias)], as ditq's exporter writes a quantized linear."""
    nodes = [helper.make_node("DequantizeLinear", [weight, f"{weight}.scale", f"{weight}.zp"], [f"{out}_w{tag}"], axis=1),
             helper.make_node("MatMul", [x_dq, f"{out}_w{tag}"], [f"{out}_mm" if bias else out])]
    if bias and int32_bias:
        nodes += [helper.make_node("DequantizeLinear", [bias, f"{bias}.scale", f"{bias}.zp"], [f"{bias}_dq{tag}"], axis=0),
                  helper.make_node("Add", [f"{out}_mm", f"{bias}_dq{tag}"], [out])]
    elif bias:
        nodes.append(helper.make_node("Add", [f"{out}_mm", bias], [out]))
    return nodes


def _weights(name, with_int32_bias=False):
    tensors = [_init(name, RNG.integers(-63, 64, (K, N)).astype(np.int8)),
               _init(f"{name}.scale", RNG.uniform(0.01, 0.02, N).astype(np.float32)),
               _init(f"{name}.zp", np.zeros(N, np.int8)),
               _init(f"{name}.bias", RNG.standard_normal(N).astype(np.float32))]
    if with_int32_bias:
        tensors += [_init(f"{name}.bias32", RNG.integers(-1000, 1000, N).astype(np.int32)),
                    _init(f"{name}.bias32.scale", np.full(N, 1e-3, np.float32)),
                    _init(f"{name}.bias32.zp", np.zeros(N, np.int32))]
    return tensors


def _block_model() -> onnx.ModelProto:
    """q and k share one input Q/DQ and fold; v feeds Gelu (kept for FastGelu); o has an int32 bias (QGemm form);
    p has no bias."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "a_scale", "a_zp"], ["x_dq"])]  # one pair, every reader
    nodes += _linear("x_dq", "q", "q_out", bias="q.bias")
    nodes += _linear("x_dq", "k", "k_out", bias="k.bias", tag="_k")
    nodes += _linear("x_dq", "v", "v_out", bias="v.bias", tag="_v")
    nodes.append(helper.make_node("Gelu", ["v_out"], ["v_gelu"], approximate="tanh"))
    nodes += _linear("x_dq", "o", "o_out", bias="o.bias32", int32_bias=True, tag="_o")
    nodes += _linear("x_dq", "p", "p_out", tag="_p")
    nodes.append(helper.make_node("Concat", ["q_out", "k_out", "v_gelu", "o_out", "p_out"], ["y"], axis=-1))
    initializers = [_init("a_scale", np.float32(0.05)), _init("a_zp", np.uint8(120))]
    for name in "qkvp":
        initializers += _weights(name)
    initializers += _weights("o", with_int32_bias=True)
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", TOKENS, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", TOKENS, 5 * N])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _layers(roles: dict[str, str]) -> dict[str, LayerRecord]:
    return {name: LayerRecord(name, "int8", "float", role) for name, role in roles.items()}


def _lowered(model: onnx.ModelProto, layers) -> tuple[onnx.ModelProto, FoldBiasIntoIntegerGemm, bool]:
    ir_model = ir.from_proto(model)
    fold = FoldBiasIntoIntegerGemm(layers)
    modified = fold(ir_model).modified
    return ir.to_proto(ir_model), fold, modified


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_bias_fold_rewrites_each_float_bias_and_says_why_it_declined_the_others():
    model = _block_model()
    lowered, fold, modified = _lowered(model, _layers({"q": "qkv", "k": "qkv", "v": "fc1", "o": "adaln", "p": "fc2"}))
    onnx.checker.check_model(lowered, full_check=True)
    assert modified
    assert fold.summary == ("folded 2 biases into MatMulIntegerToFloat (2 qkv); declined "
                            "1 fc1: feeds Gelu (ONNX Runtime fuses that bias into FastGelu(x, bias)), "
                            "1 adaln: bias not a float constant (int32 bias: ONNX Runtime's QGemm takes it), "
                            "1 fc2: no single bias Add after the MatMul")
    before, after = Counter(n.op_type for n in model.graph.node), Counter(n.op_type for n in lowered.graph.node)
    assert after["MatMulIntegerToFloat"] == 2 and after["MatMul"] == before["MatMul"] - 2
    assert after["Add"] == before["Add"] - 2
    assert after["DequantizeLinear"] == before["DequantizeLinear"] - 2  # q's and k's weight DQs; x's DQ still read
    assert after["QuantizeLinear"] == 1  # the shared input quantizer stays one node
    fused = [n for n in lowered.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert [list(n.input) for n in fused] == [
        ["x_q", name, "a_scale", f"{name}.scale", "a_zp", f"{name}.zp", f"{name}.bias"] for name in "qk"]
    assert [n.output[0] for n in fused] == ["q_out", "k_out"] and {n.domain for n in fused} == {"com.microsoft"}
    # numerics: ONNX Runtime on both forms, same integer products, float rounding only
    feeds = {"x": RNG.uniform(-3, 3, (2, TOKENS, K)).astype(np.float32)}
    expected, got = _run(model, feeds), _run(lowered, feeds)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_bias_fold_reaches_into_if_branches_with_per_group_parameters():
    """Each branch reads its own bias and input scale (``<name>__group<g>`` in the outer graph) and the shared
    weight; the fold keeps exactly those."""
    outer = [_init("q", RNG.integers(-63, 64, (K, N)).astype(np.int8)),
             _init("q.scale", RNG.uniform(0.01, 0.02, N).astype(np.float32)), _init("q.zp", np.zeros(N, np.int8))]
    branches = []
    for g in range(2):
        outer += [_init(f"q.bias__group{g}", RNG.standard_normal(N).astype(np.float32)),
                  _init(f"a_scale__group{g}", np.float32(0.04 + 0.02 * g)), _init(f"a_zp__group{g}", np.uint8(100 + g))]
        nodes = [helper.make_node("QuantizeLinear", ["x", f"a_scale__group{g}", f"a_zp__group{g}"], [f"g{g}/x_q"]),
                 helper.make_node("DequantizeLinear", [f"g{g}/x_q", f"a_scale__group{g}", f"a_zp__group{g}"],
                                  [f"g{g}/x_dq"])]
        nodes += _linear(f"g{g}/x_dq", "q", f"g{g}/y", bias=f"q.bias__group{g}", tag=f"_{g}")
        branches.append(helper.make_graph(nodes, f"group{g}", [], [
            helper.make_tensor_value_info(f"g{g}/y", TensorProto.FLOAT, ["b", TOKENS, N])]))
    graph = helper.make_graph(
        [helper.make_node("If", ["pick"], ["y"], then_branch=branches[0], else_branch=branches[1])], "outer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", TOKENS, K]),
         helper.make_tensor_value_info("pick", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", TOKENS, N])], outer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    lowered, fold, _ = _lowered(model, _layers({"q": "qkv"}))
    onnx.checker.check_model(lowered, full_check=True)
    assert fold.summary == "folded 2 biases into MatMulIntegerToFloat (2 qkv)"
    fused = [n for n in _all_nodes(lowered.graph) if n.op_type == "MatMulIntegerToFloat"]
    assert sorted(tuple(n.input) for n in fused) == [
        (f"g{g}/x_q", "q", f"a_scale__group{g}", "q.scale", f"a_zp__group{g}", "q.zp", f"q.bias__group{g}")
        for g in range(2)]
    assert not [n for n in _all_nodes(lowered.graph) if n.op_type in ("MatMul", "Add", "DequantizeLinear")]
    x = RNG.uniform(-3, 3, (3, TOKENS, K)).astype(np.float32)
    for pick in (True, False):
        feeds = {"x": x, "pick": np.array(pick)}
        expected, got = _run(model, feeds), _run(lowered, feeds)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.fixture(scope="module")
def two_groups(tiny_dit_dir, tmp_path_factory):
    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler.pipeline import compile_with_result

    config = CompileConfig(calibration=CalibrationConfig(steps=6, samples=2), groups=2)
    return compile_with_result(tiny_dit_dir, tmp_path_factory.mktemp("two_groups") / "art", config)


def _branches(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    return [a.g for n in graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch"]


@pytest.mark.slow
def test_every_branch_runs_fastgelu_with_its_bias_and_integer_gemms_with_theirs(two_groups):
    from conftest import TINY_CONFIG
    from ditq_compiler.exporters import optimized_model

    artifact, result = two_groups
    blocks = TINY_CONFIG["num_layers"]
    branches = _branches(optimized_model(artifact.model_path).graph)
    assert len(branches) == 2
    for branch in branches:
        ops = Counter(n.op_type for n in branch.node)
        assert ops["FastGelu"] == blocks and ops["Gelu"] == 0
        fc1_biases = {f"transformer_blocks.{i}.ff.net.0.proj.bias" for i in range(blocks)}
        gelu_biases = {n.input[1].split("__group")[0] for n in branch.node if n.op_type == "FastGelu"}
        assert gelu_biases == fc1_biases  # FastGelu(x, bias): no separate fc1 bias Add
        layer_biases = {f"{layer}.bias" for layer in result.quantized_layers}
        assert not [n for n in branch.node if n.op_type == "Add" and
                    any(name.split("__group")[0] in layer_biases for name in n.input)]  # no quantized layer's bias Add
        with_bias = [n for n in branch.node if n.op_type == "MatMulIntegerToFloat" and len(n.input) == 7]
        assert len(with_bias) == 5 * blocks  # q, k, v, attention out, fc2
    assert artifact.manifest["fusion"]["fused_layers"] == len(result.quantized_layers)
    summary = next(p["summary"] for p in artifact.manifest["lowering"]["passes"]
                   if p["name"] == "fold_bias_into_integer_gemm")
    assert summary.startswith(f"folded {2 * 5 * blocks} biases into MatMulIntegerToFloat")
