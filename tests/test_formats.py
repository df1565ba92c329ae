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
from ditq_compiler.grids import FLOAT8_E4M3_MAX, GRIDS, grid_integers, quantize_float8, round_to_grid
from ditq_compiler.numerics import agreement
from ditq_compiler.tracing import example_inputs


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
# the 2-d adaLN modulation), and the bytes per weight the artifact stores.
EXPECTED = {
    "w8a8": ({"MatMulIntegerToFloat"}, {"QGemm"}, 1.0),
    "w4a8": ({"MatMulIntegerToFloat"}, {"QGemm"}, 0.5),
    "fp8": ({"MatMul", "FusedMatMul"}, {"Gemm", "MatMul", "FusedMatMul"}, 1.0),
    "fp4": ({"MatMulIntegerToFloat"}, {"QGemm"}, 0.5),
}
_FORMAT_ARTIFACTS: dict = {}


def _format_artifact(fmt, groups, tiny_dit_dir, tmp_path_factory):
    key = (fmt, groups)
    if key not in _FORMAT_ARTIFACTS:
        from ditq_compiler.pipeline import compile_with_result

        config = CompileConfig(format=fmt, groups=groups, grouping="uniform",
                               calibration=CalibrationConfig(steps=6, samples=2))
        _FORMAT_ARTIFACTS[key] = compile_with_result(tiny_dit_dir, tmp_path_factory.mktemp(f"{fmt}{groups}") / "a",
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


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("fmt", list(EXPECTED))
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
    count = sum(int(np.prod(r.graph_module.graph_modules()[0].get_buffer(w).shape))
                for r in [result] for w in result.layer_weights.values())
    assert _weight_bytes(model, layers) == pytest.approx(count * bytes_per_weight, rel=0.01)
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
    from ditq_compiler.tracing import trace_dit

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
