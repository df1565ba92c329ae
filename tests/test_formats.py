"""Low-bit formats: the grids against independent references, FP8 bit for bit against ONNX Runtime, 4-bit
packing round trips, and for every format an artifact of the tiny DiT that ONNX Runtime loads, fuses as the
format promises, and runs like its torch fake-quant graph."""

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch

from conftest import TINY_CONFIG
from ditq_compiler import CalibrationConfig, CompileConfig
from ditq_compiler.config import LayerRule
from ditq_compiler.grids import FLOAT8_E4M3_MAX, GRIDS, grid_integers, quantize_float8, round_to_grid
from ditq_compiler.numerics import agreement
from conftest import example_inputs


def _ties_and_neighbours(grid, scale: float) -> torch.Tensor:
    values = grid.values().numpy()
    mids = (values[1:] + values[:-1]) / 2
    near = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    beyond = np.array([grid.max * 1.5, -grid.max * 3, grid.max, -grid.max, 0.0])
    rng = np.random.default_rng(0)
    return torch.tensor(np.concatenate([near, beyond, rng.normal(0, grid.max / 2, 4000)]) * scale,
                        dtype=torch.float32)


def test_e2m1_rounding_is_ocp_fp4_round_to_nearest_even():
    """ml_dtypes' float4_e2m1fn (the OCP MX FP4 type) is an independent reference, ties included."""
    scale = 0.37
    x = _ties_and_neighbours(GRIDS["e2m1"], scale)
    ours = round_to_grid(x, scale, GRIDS["e2m1"]) / scale
    v = (x / torch.tensor(scale)).numpy().clip(-6, 6)  # the same float32 division, then the reference cast
    reference = v.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(ours.numpy(), reference)


def test_int4_rounding_is_round_half_even_with_saturation():
    x = _ties_and_neighbours(GRIDS["int4"], 0.5)
    ours = round_to_grid(x, 0.5, GRIDS["int4"]) / 0.5
    reference = np.clip(np.round((x / torch.tensor(0.5)).numpy()), -7, 7)
    np.testing.assert_array_equal(ours.numpy(), reference)


def test_e3m0_rounding_picks_the_nearest_power_of_two():
    """E3M0 has no library type: the reference enumerates the grid. Ties (the midpoints) are listed
    explicitly: the binade rule sends them to the upper point, except 0.125 (between 0 and 0.25)."""
    grid = GRIDS["e3m0"]
    x = _ties_and_neighbours(grid, 1.0)
    ours = round_to_grid(x, 1.0, grid).numpy()
    values = grid.values().numpy()
    distance = np.abs(x.numpy()[:, None] - values[None, :])
    nearest = values[distance.argmin(axis=1)]
    tie = np.isclose(distance, distance.min(axis=1, keepdims=True), rtol=0, atol=0).sum(axis=1) > 1
    np.testing.assert_array_equal(ours[~tie], nearest[~tie])
    expected_ties = {0.125: 0.0, 0.375: 0.5, 0.75: 1.0, 1.5: 2.0, 3.0: 4.0, 6.0: 8.0, 12.0: 16.0}
    for midpoint, winner in expected_ties.items():
        assert float(round_to_grid(torch.tensor([midpoint, -midpoint]), 1.0, grid)[0]) == winner
        assert float(round_to_grid(torch.tensor([-midpoint]), 1.0, grid)[0]) == -winner


@pytest.mark.parametrize("name", list(GRIDS))
def test_grid_values_times_the_multiplier_are_int8_codes_and_round_trip(name):
    grid = GRIDS[name]
    table = grid.lookup_table()
    assert table.dtype == torch.int8 and int(table.abs().max()) <= 64
    w = torch.randn(7, 13) * 3  # odd sizes
    scale = w.abs().amax(dim=1) / grid.max
    integers = grid_integers(w, scale, grid, axis=0)
    codes = grid.codes(integers)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.equal(table[codes.long()], integers)  # the lookup ONNX Runtime does at load
    torch.testing.assert_close(integers.float() / grid.multiplier * scale[:, None],
                               round_to_grid(w, scale[:, None], grid), rtol=0, atol=0)


def test_fp8_quantize_matches_onnx_runtime_bit_for_bit():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    e4m3 = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = e4m3[torch.isfinite(e4m3)].unique()
    mids = (finite[1:] + finite[:-1]) / 2  # every tie, subnormals included
    x = torch.cat([finite, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9)),
                   torch.tensor([500.0, -1e6, 448.0, 1e-9])]).float()
    scale = torch.tensor(1.0)
    ours = quantize_float8(x, scale).view(torch.uint8).numpy()
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], saturate=1)]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.numel()])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, [x.numel()])],
                              [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                               helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(ours, np.asarray(theirs).view(np.uint8))
    assert float(quantize_float8(torch.tensor([1e6]), scale).float()) == FLOAT8_E4M3_MAX  # saturates
    # and the independent reference: ml_dtypes' float8_e4m3fn cast of the clamped value
    reference = np.clip(x.numpy(), -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(ours, reference)


def test_int4_packing_round_trip_through_the_cpu_lowering():
    """Odd sizes, and every value: the INT4 initializer the artifact stores, unpacked by onnx, is the int8
    weight the fx graph held."""
    import onnx_ir as ir

    from ditq_compiler.exporters.lowering import LayerRecord
    from ditq_compiler.exporters.lowering.cpu import PackInt4Weights
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weight = rng.integers(-8, 8, size=(13, 7)).astype(np.int8)
    weight[0, :7] = np.arange(-8, -1)  # both extremes present
    weight[1, :7] = np.arange(1, 8)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=1),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7])],
                              [numpy_helper.from_array(weight, "w"),
                               numpy_helper.from_array(np.full(7, 0.1, np.float32), "s"),
                               numpy_helper.from_array(np.zeros(7, np.int8), "z")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    result = PackInt4Weights({"layer": LayerRecord("w", "int4", "float", "qkv")})(model)
    assert result.modified
    proto = ir.to_proto(model)
    stored = {t.name: t for t in proto.graph.initializer}["w.int4"]
    assert stored.data_type == TensorProto.INT4 and len(stored.raw_data) == (13 * 7 + 1) // 2
    np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.int8), weight)
    assert [n.op_type for n in proto.graph.node][:1] == ["Cast"]


# ------------------------------------------------------------------------------------------------
# Every format: an artifact ONNX Runtime runs as promised
# ------------------------------------------------------------------------------------------------

# The kernel ONNX Runtime's CPU provider runs for each quantized layer, per format (3-d token inputs, and
# the 2-d adaLN modulation), and the bytes per weight the artifact stores. Variants beyond the four formats:
# block-wise int4 weights (MatMulNBits at accuracy level 1: float compute of the calibrated input), and
# dynamic activations (MatMulNBits at accuracy level 4 for block-wise int4; DynamicQuantizeMatMul for the
# int8 fc2 a layer rule asks for; bytes are then per layer, see _promised_bytes).
EXPECTED = {
    "w8a8": ({"MatMulIntegerToFloat"}, {"QGemm"}, 1.0),
    "w4a8": ({"MatMulIntegerToFloat"}, {"QGemm"}, 0.5),
    "fp8": ({"MatMul", "FusedMatMul"}, {"Gemm", "MatMul", "FusedMatMul"}, 1.0),
    "fp4": ({"MatMulIntegerToFloat"}, {"QGemm"}, 0.5),
    "w4a8-block32": ({"MatMulNBits"}, {"MatMulNBits"}, 0.5),
    "w4a8-block64-dynamic": ({"MatMulNBits", "DynamicQuantizeMatMul"}, {"MatMulNBits"}, None),
}
VARIANTS = {
    "w4a8-block32": dict(format="w4a8", weight_block=32),
    # block 64 > K = 32 of the tiny DiT's q/k/v/out/fc1/adaLN: one partial block per row (padded)
    "w4a8-block64-dynamic": dict(format="w4a8", weight_block=64, act="dynamic",
                                 layer_rules=(LayerRule("*.ff.net.2", "int8"),)),
}
CASES = [(fmt, groups) for fmt in ("w8a8", "w4a8", "fp8", "fp4") for groups in (1, 2)] + \
    [("w4a8-block32", 2), ("w4a8-block64-dynamic", 1)]
_FORMAT_ARTIFACTS: dict = {}


def _format_artifact(fmt, groups, tiny_dit_dir, tmp_path_factory):
    key = (fmt, groups)
    if key not in _FORMAT_ARTIFACTS:
        from ditq_compiler.pipeline import compile_with_result

        options = VARIANTS.get(fmt, dict(format=fmt))
        config = CompileConfig(**options, groups=groups, grouping="uniform",
                               calibration=CalibrationConfig(steps=6, samples=2))
        _FORMAT_ARTIFACTS[key] = compile_with_result(tiny_dit_dir, tmp_path_factory.mktemp(f"{fmt}-{groups}") / "a",
                                                     config)
    return _FORMAT_ARTIFACTS[key]


def _weight_bytes(model: onnx.ModelProto, layers: dict) -> int:
    """Bytes stored for the quantized weights (whatever form the lowering chose)."""
    stored = 0
    for tensor in model.graph.initializer:
        base = tensor.name.split("__group")[0]
        for record in layers.values():
            weight = record["weight"].replace(".dequantized", "")
            if base in (weight, f"{weight}.int4", f"{weight}.codes"):
                stored += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return stored


def _promised_bytes(shape, weight_format: str) -> int:
    """Bytes a weight [K, N] takes in its format: int4 two a byte, block-wise int4 padded to whole blocks."""
    k, n = shape
    if "-block" in weight_format:
        block = int(weight_format.split("-block")[1])
        return n * -(-k // block) * block // 2
    return k * n if weight_format in ("int8", "float8e4m3fn") else -(-k * n // 2)


@pytest.mark.slow
@pytest.mark.parametrize("fmt, groups", CASES)
def test_format_artifact_runs_as_promised(fmt, groups, tiny_dit_dir, tmp_path_factory):
    from ditq_compiler.exporters import fusion_report

    artifact, result = _format_artifact(fmt, groups, tiny_dit_dir, tmp_path_factory)
    model = onnx.load(artifact.model_path)
    onnx.checker.check_model(model, full_check=True)
    layers = artifact.manifest["layers"]
    from ditq_compiler.exporters.lowering import LayerRecord

    report = fusion_report(artifact.model_path, {k: LayerRecord.from_manifest(v) for k, v in layers.items()})
    tokens, modulation, bytes_per_weight = EXPECTED[fmt]
    for layer, op in report.layer_ops.items():
        allowed = modulation if layer.endswith("norm1.linear") else tokens
        assert op in allowed, (fmt, layer, op)
    assert set(report.readers.values()) == {groups}
    # the weight bytes the format promises (every weight shared by the groups: stored once)
    buffers = result.graph_module.graph_modules()[0]
    if bytes_per_weight is not None:
        count = sum(int(np.prod(buffers.get_buffer(w).shape)) for w in result.layer_weights.values())
        assert _weight_bytes(model, layers) == pytest.approx(count * bytes_per_weight, rel=0.01)
    promised = sum(_promised_bytes(buffers.get_buffer(result.layer_weights[key]).shape, record["weight_format"])
                   for key, record in layers.items())
    assert _weight_bytes(model, layers) == promised
    # ONNX Runtime against each group's torch fake-quant graph
    x, _, y = example_inputs(TINY_CONFIG, batch=3, seed=7)
    for group, branch in zip(result.context.timestep_groups, result.graph_module.graph_modules()):
        t = torch.tensor([group.start, (group.start + group.end) // 2, group.end])
        with torch.no_grad():
            expected = branch(x, t, y).numpy()
        got = artifact.session("cpu").run(["out"], {"sample": x.numpy(), "timestep": t.numpy(),
                                                    "class_labels": y.numpy()})[0]
        match = agreement(got, expected)
        assert match.ok, (fmt, group, match.describe())


@pytest.mark.slow
def test_block_and_dynamic_artifacts_have_the_kernels_written_out(tiny_dit_dir, tmp_path_factory):
    """Structure of the lowered graphs: every block-wise layer is one MatMulNBits with its accuracy level written
    on the node (1 with static inputs, 4 with dynamic ones; never ONNX Runtime's default), no dynamic marker is
    left, and the dynamic int8 layer is DynamicQuantizeMatMul reading the float input."""
    from ditq_compiler.exporters.ort_inspect import _all_nodes

    def ops(fmt, groups):
        artifact, _ = _format_artifact(fmt, groups, tiny_dit_dir, tmp_path_factory)
        model = onnx.load(artifact.model_path)
        nodes = list(_all_nodes(model.graph))
        levels = sorted(next(a.i for a in n.attribute if a.name == "accuracy_level")
                        for n in nodes if n.op_type == "MatMulNBits")
        producers = {o: n.op_type for n in nodes for o in n.output}
        return model, nodes, levels, producers, artifact.manifest

    model, nodes, levels, producers, manifest = ops("w4a8-block32", 2)
    assert levels == [1] * 28  # 14 layers in each group's branch
    assert {producers.get(n.input[0]) for n in nodes if n.op_type == "MatMulNBits"} == {"DequantizeLinear"}
    assert not any(n.op_type in ("DynamicQuantizeLinear", "DynamicQuantizeMatMul") for n in nodes)
    assert all((r["weight_format"], r["activation"]) == ("int4-block32", "static") for r in manifest["layers"].values())
    assert manifest["weight_block"] == 32 and manifest["act"] == "static"
    stored = {t.name.split("__group")[0] for t in model.graph.initializer}
    assert not any(name.endswith(".weight_quantized") for name in stored)  # only the packed 4-bit copies

    model, nodes, levels, producers, manifest = ops("w4a8-block64-dynamic", 1)
    assert levels == [4] * 12  # q, k, v, out, fc1, adaLN of 2 blocks; fc2 is int8 by the rule
    kinds = [n.op_type for n in nodes
             if n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul", "DynamicQuantizeLinear")]
    assert kinds.count("DynamicQuantizeMatMul") == 2 and "DynamicQuantizeLinear" not in kinds
    inputs = {producers.get(n.input[0]) for n in nodes if n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul")}
    assert not inputs & {"QuantizeLinear", "DequantizeLinear"}  # the kernels quantize the float input themselves
    assert not any(n.domain == "ai.ditq" for n in nodes) and "ai.ditq" not in {o.domain for o in model.opset_import}
    formats = {key: (r["weight_format"], r["activation"]) for key, r in manifest["layers"].items()}
    assert formats["transformer_blocks.0.ff.net.2"] == ("int8", "dynamic")
    assert formats["transformer_blocks.0.attn1.to_q"] == ("int4-block64", "dynamic")


def _block_layer_model(k: int, n: int, block: int, dynamic: bool, rng):
    """The canonical form the exporter writes for one block-wise layer with a bias: a static uint8 Q/DQ input or
    the dynamic marker, DequantizeLinear(int4 in int8, block_size) and MatMul + Add."""
    from onnx import TensorProto, helper, numpy_helper

    blocks = -(-k // block)
    weight = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, size=(blocks, n)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    if dynamic:
        head = [helper.make_node("DynamicQuantizeBlock", ["x"], ["xd"], domain="ai.ditq", block_size=block)]
    else:
        head = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    nodes = head + [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0, block_size=block),
                    helper.make_node("MatMul", ["xd", "wd"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(np.zeros((blocks, n), np.int8), "wz"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
             numpy_helper.from_array(np.array(120, np.uint8), "xz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])], inits)
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("ai.ditq", 1)] if dynamic else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model, weight, scale, bias


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("k, block", [(100, 32), (100, 64), (32, 128), (256, 128)])
def test_block_weights_lower_to_matmul_nbits_exactly(k, block, dynamic):
    """Blocks that do not divide K (100 = 3 x 32 + 4; 32 < 128) are handled, not refused. ONNX Runtime's
    MatMulNBits against the torch fake-quant arithmetic: relative L2 <= 1e-5 (measured 1e-7 to 5e-7: float
    accumulation order; a wrong block, scale layout or nibble order is off by O(1))."""
    import onnx_ir as ir
    import onnxruntime as ort

    from ditq_compiler.exporters.lowering import LayerRecord
    from ditq_compiler.exporters.lowering.cpu_nbits import BlockWeightsToMatMulNBits
    from ditq_compiler.quantizers import dynamic_fake_quantize

    rng = np.random.default_rng(k + block)
    proto, weight, scale, bias = _block_layer_model(k, 24, block, dynamic, rng)
    model = ir.from_proto(proto)
    layers = {"l": LayerRecord("w", f"int4-block{block}", "float", "fc1", "dynamic" if dynamic else "static")}
    lowering = BlockWeightsToMatMulNBits(layers)
    assert lowering(model).modified
    lowered = ir.to_proto(model)
    onnx.checker.check_model(lowered)
    expected_ops = ["MatMulNBits"] if dynamic else ["QuantizeLinear", "DequantizeLinear", "MatMulNBits"]
    assert [n.op_type for n in lowered.graph.node] == expected_ops
    kernel = lowered.graph.node[-1]
    attributes = {a.name: a.i for a in kernel.attribute}
    assert attributes == {"K": k, "N": 24, "bits": 4, "block_size": block, "accuracy_level": 4 if dynamic else 1}
    assert list(kernel.input)[-1] == "b" and layers["l"].weight == "w.nbits"
    # the int8 weight, its scales and zero points are gone (xs, xz: the static input's, unread when dynamic)
    assert {t.name for t in lowered.graph.initializer} == {"w.nbits", "ws.nbits", "b", "xs", "xz"}
    assert "ai.ditq" not in {o.domain for o in lowered.opset_import}
    x = (rng.normal(size=(2, 5, k)) * 2).astype(np.float32)
    x[0, 1, 3] = 30.0  # an outlier: the dynamic blocks that hold it get a coarser step
    options = ort.SessionOptions()
    options.log_severity_level = 3
    got = ort.InferenceSession(lowered.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    xt = torch.from_numpy(x)
    if dynamic:
        x_dq = dynamic_fake_quantize(xt, block)
    else:
        s, z = torch.tensor(0.02), torch.tensor(120, dtype=torch.uint8)
        x_dq = torch.ops.ditq.dequantize(torch.ops.ditq.quantize(xt, s, z, 0), s, z, 0)
    w_dq = torch.ops.ditq.dequantize_block(torch.from_numpy(weight), torch.from_numpy(scale),
                                           torch.zeros(scale.shape, dtype=torch.int8), 0, block)
    expected = (x_dq @ w_dq + torch.from_numpy(bias)).numpy()
    assert agreement(got, expected).rel_l2 <= 1e-5


def test_dynamic_per_tensor_quantization_is_onnx_runtimes():
    """DynamicQuantizeLinear + DequantizeLinear in ONNX Runtime and dynamic_fake_quantize agree bit for bit
    (ranges with and without 0, a constant tensor); DynamicQuantizeMatMul with 7-bit weights (no u8 x s8
    saturation) to float rounding (relative L2 <= 1e-5, measured ~2e-7)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ditq_compiler.quantizers import dynamic_fake_quantize

    def session(nodes, inits):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    qdq = session([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
                   helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], [])
    rng = np.random.default_rng(3)
    weight = rng.integers(-63, 64, size=(48, 20)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, 20).astype(np.float32)
    bias = rng.normal(size=20).astype(np.float32)
    gemm = session([helper.make_node("DynamicQuantizeMatMul", ["x", "w", "ws", "wz", "b"], ["y"],
                                     domain="com.microsoft")],
                   [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(w_scale, "ws"),
                    numpy_helper.from_array(np.zeros(20, np.int8), "wz"), numpy_helper.from_array(bias, "b")])
    for shift, spread in ((0.0, 1.0), (3.0, 0.5), (-2.0, 4.0), (0.7, 0.0)):
        x = (rng.normal(size=(2, 9, 48)) * spread + shift).astype(np.float32)
        ours = dynamic_fake_quantize(torch.from_numpy(x), None)
        np.testing.assert_array_equal(qdq.run(None, {"x": x})[0], ours.numpy())
        expected = ours.numpy() @ (weight.astype(np.float32) * w_scale) + bias
        assert agreement(gemm.run(None, {"x": x})[0], expected).rel_l2 <= 1e-5


def test_block_weight_scales_are_searched_per_block():
    """--weight-block: one scale per block of each row, the partial last block from its own columns only, and
    the quantized weight a per-block round-trip of the float one."""
    from ditq_compiler.passes.params import search_weight_scale
    from ditq_compiler.qspec import QuantizerSpec
    from ditq_compiler.quantizers import fake_quantize_weight, quantize_weight

    spec = QuantizerSpec.integer("int4", "block", True, block_size=32)
    weight = torch.randn(5, 70)
    weight[:, 64:] *= 0.01  # the partial block (6 columns): a much smaller range
    for method in ("minmax", "mse", "percentile"):
        scale, _ = search_weight_scale(weight, spec, method)
        assert scale.shape == (5, 3)
        if method == "minmax":
            for j, (start, end) in enumerate(((0, 32), (32, 64), (64, 70))):
                torch.testing.assert_close(scale[:, j], weight[:, start:end].abs().amax(dim=1) / 7)
        stored = quantize_weight(weight, scale, spec)
        assert stored.dtype == torch.int8 and int(stored.abs().max()) <= 7
        per_block = scale.repeat_interleave(32, dim=1)[:, :70]
        torch.testing.assert_close(fake_quantize_weight(weight, scale, spec), stored.float() * per_block)
        if method == "minmax":  # nothing clipped: within half a step of its own block
            assert float(((fake_quantize_weight(weight, scale, spec) - weight).abs() / per_block).max()) <= 0.5 + 1e-4


def test_block_and_dynamic_options_refused_where_no_kernel_runs_them():
    from ditq_compiler.errors import ConfigError

    cases = {
        "--weight-block must be one of 32, 64, 128, got 48": dict(format="w4a8", weight_block=48),
        "--weight-block applies to int4 weights": dict(format="w8a8", weight_block=64),
        "--weight-block runs on --target cpu only": dict(format="w4a8", weight_block=64, target="cuda"),
        "--act dynamic applies to int8 and int4 layers only": dict(format="fp4", act="dynamic"),
        "--act dynamic runs on --target cpu only": dict(format="w8a8", act="dynamic", target="tensorrt"),
        "unknown --act 'per-token'": dict(act="per-token"),
    }
    for message, options in cases.items():
        with pytest.raises(ConfigError, match=message.replace("-", "\\-")):
            CompileConfig(**options).validate()
    CompileConfig(format="w8a8", weight_block=32, layer_rules=(LayerRule("*.ff.*", "int4"),)).validate()


# ------------------------------------------------------------------------------------------------
# Mixed precision
# ------------------------------------------------------------------------------------------------

def _model_with_a_sensitive_layer():
    """Block 1's fc2: one huge input column in every row, so per-channel int4 scales flush the rest of
    each row to zero — quantizing that layer alone costs far more than any other."""
    from conftest import make_tiny_dit

    model = make_tiny_dit()
    with torch.no_grad():
        model.transformer_blocks[1].ff.net[2].weight[:, 0] *= 60
    return model


def test_mixed_precision_moves_the_layer_made_sensitive(tmp_path):
    from ditq_compiler.pipeline import run_pipeline

    path = tmp_path / "dit"
    _model_with_a_sensitive_layer().save_pretrained(path, safe_serialization=True)
    config = CompileConfig(format="w4a8", groups=2, calibration=CalibrationConfig(steps=6, samples=2),
                           keep_sensitive=1)
    result = run_pipeline(path, config)
    kept = result.context.mixed_precision["kept"]
    assert [k["layer"] for k in kept] == ["transformer_blocks.1.ff.net.2"]
    assert kept[0]["precision"] == "int8" and kept[0]["rank"] == 1 and set(kept[0]["sensitivity"]) == {"0", "1"}
    for gm in result.graph_module.graph_modules():  # every group's branch: int8 there, int4 elsewhere
        formats = {layer: record.weight_format for layer, record in result.layers.items()}
        assert formats["transformer_blocks.1.ff.net.2"] == "int8" and formats["transformer_blocks.0.ff.net.2"] == "int4"
    record = next(r for r in result.pass_manager.records if r.name == "mixed_precision")
    assert "moved 1 layers (1 inputs) up: transformer_blocks.1.ff.net.2 -> int8" in record.summary


def test_mixed_precision_budget(tmp_path):
    from ditq_compiler.errors import ConfigError
    from ditq_compiler.pipeline import run_pipeline

    path = tmp_path / "dit"
    _model_with_a_sensitive_layer().save_pretrained(path, safe_serialization=True)
    calibration = CalibrationConfig(steps=4, samples=2)
    result = run_pipeline(path, CompileConfig(format="w4a8", calibration=calibration, budget_mb=0.0208))
    moved = [k["layer"] for k in result.context.mixed_precision["kept"]]
    assert moved and moved[0] == "transformer_blocks.1.ff.net.2"
    with pytest.raises(ConfigError, match="--budget-mb 0.001: the quantized weights alone take"):
        run_pipeline(path, CompileConfig(format="w4a8", calibration=calibration, budget_mb=0.001))
    with pytest.raises(ConfigError, match="either --keep-sensitive or --budget-mb"):
        CompileConfig(keep_sensitive=1, budget_mb=1.0).validate()


# ------------------------------------------------------------------------------------------------
# Hadamard rotation
# ------------------------------------------------------------------------------------------------

def test_hadamard_blocks_are_orthonormal():
    from ditq_compiler.passes.rotation import block_diagonal, block_size, hadamard

    for size in (2, 16, 128):
        h = hadamard(size)
        torch.testing.assert_close(h @ h, torch.eye(size, dtype=torch.float64))
    assert block_size(1152) == 128 and block_size(384) == 128 and block_size(768) == 256 and block_size(3) == 1
    r = block_diagonal(96, 32)
    torch.testing.assert_close(r @ r.T, torch.eye(96, dtype=torch.float64))


def test_hadamard_rotation_keeps_the_function_in_float32():
    """The fold into V and the online rotations together: the float graph computes the same function to
    1e-5 (float32 reassociation only), and the counts say where each rotation went."""
    from test_smoothing import modulated_dit

    from ditq_compiler.context import CompileContext
    from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG
    from ditq_compiler.pass_manager import PassManager
    from ditq_compiler.passes import AnnotateLinearQuantization
    from ditq_compiler.passes.rotation import RotateHadamard
    from conftest import trace_dit

    model = modulated_dit()
    inputs = example_inputs(TINY_CONFIG, batch=3, seed=5)
    with torch.no_grad():
        reference = model(*inputs).sample
    gm = trace_dit(model, inputs)
    ctx = CompileContext(CompileConfig(rotate="hadamard"), dict(model.config), dict(DEFAULT_SCHEDULER_CONFIG), inputs)
    manager = PassManager([AnnotateLinearQuantization(), RotateHadamard()])
    gm = manager.run(gm, ctx)
    assert manager.records[-1].summary == "Hadamard-rotated quantized inputs: 8 online, 2 folded into V"
    with torch.no_grad():
        rotated = gm(*inputs)
    assert float((rotated - reference).abs().max() / reference.abs().max()) <= 1e-5
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count("aten.unflatten.int") == 8  # one online rotation per input that has no fold


def test_the_numeric_check_perturbs_fp4_grid_rounding():
    """FP4 activations are rounded by ``round_to_grid`` before an exact quantize: the sensitivity probe must
    perturb that rounding too, or it reports zero sensitivity and any honest rounding flip fails the compile."""
    from ditq_compiler.numerics import _PerturbedQuantizers

    class RoundFP4(torch.nn.Module):
        def forward(self, x):
            return torch.ops.ditq.round_to_grid.default(x, torch.tensor(1.0), "e2m1")

    gm = torch.fx.symbolic_trace(RoundFP4())
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 200)  # ties: any noise flips them
    moved = _PerturbedQuantizers(gm, seed=0).run(midpoints)
    assert (moved != gm(midpoints)).float().mean() > 0.25
