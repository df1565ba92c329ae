"""Targets: the tiny DiT compiled for ONNX Runtime's CPU, CUDA and TensorRT providers, re-lowered between them,
and the inverse of every CPU lowering pass. Everything runs on the CPU provider; the GPU tests (marked ``gpu``)
skip where no provider can start."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import LAYERS_PER_BLOCK, TINY_CONFIG
from ditq_compiler.exporters import fusion_report
from ditq_compiler.exporters.lowering import (INVERSES, LayerRecord, LoweringContext, lower, raise_to_canonical,
                                              target_passes)
from ditq_compiler.exporters.lowering.cuda import (FLOAT16_MAX_ERROR_TOLERANCE, FLOAT16_REL_L2_TOLERANCE,
                                                   PRECISION_KEY)
from ditq_compiler.numerics import agreement
from conftest import example_inputs

TARGETS = ("cpu", "cuda", "tensorrt")
GROUPS = {"cpu": 1, "cuda": 1, "tensorrt": 2}  # tensorrt with groups: one model file per group

# The kernel each quantized layer must become, per target and layer role. cpu and cuda: the op ONNX Runtime's
# optimized graph runs on the layer's weight (CPU provider; the CUDA provider has the same contrib kernels);
# tensorrt: the explicit form TensorRT fuses (an int8 Q/DQ input and a DequantizeLinear weight into MatMul).
EXPECTED_KERNEL = {
    "cpu": {"adaln": "QGemm", "qkv": "MatMulIntegerToFloat", "attn_out": "MatMulIntegerToFloat",
            "fc1": "MatMulIntegerToFloat", "fc2": "MatMulIntegerToFloat"},
    "cuda": {role: "MatMulNBits" for role in ("adaln", "qkv", "attn_out", "fc1", "fc2")},
    "tensorrt": {role: "Q/DQ MatMul" for role in ("adaln", "qkv", "attn_out", "fc1", "fc2")},
}


@pytest.fixture(scope="module")
def compiled(tiny_dit_dir, fast_config, tmp_path_factory):
    """target -> (artifact, pipeline result), the tiny DiT compiled once per target."""
    from ditq_compiler.pipeline import compile_with_result

    root = tmp_path_factory.mktemp("targets")
    return {target: compile_with_result(tiny_dit_dir, root / target,
                                        replace(fast_config, target=target, groups=GROUPS[target]))
            for target in TARGETS}


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attribute.g)


def feeds(batch: int, seed: int) -> dict:
    x, t, y = example_inputs(TINY_CONFIG, batch=batch, seed=seed)
    return {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()}


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_compiles_passes_the_checker_and_keeps_the_interface(compiled, target):
    artifact, _ = compiled[target]
    assert artifact.manifest["target"] == artifact.manifest["lowering"]["target"] == target
    for path in [artifact.model_path, *artifact.group_model_paths]:
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        assert inputs == {"sample": TensorProto.FLOAT, "timestep": TensorProto.INT64,
                          "class_labels": TensorProto.INT64}
        assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [("out", TensorProto.FLOAT)]
    out = artifact.session("cpu").run(["out"], feeds(2, 1))[0]
    assert out.dtype == np.float32 and out.shape == (2, 8, 8, 8) and np.isfinite(out).all()


def test_cuda_artifact_runs_on_the_cpu_provider_and_matches_the_weight_only_torch_graph(compiled):
    """MatMulNBits and MultiHeadAttention have CPU kernels, so the float16 artifact runs here; it must match the
    torch weight-only fake-quant graph within the float16 tolerance (lowering/cuda.py states it)."""
    artifact, result = compiled["cuda"]
    assert "not applied" in artifact.manifest["lowering"]["activation_quantization"]
    session = artifact.session("cpu")
    for batch, seed in ((1, 3), (4, 4)):
        ort_out = session.run(["out"], feeds(batch, seed))[0]
        x, t, y = example_inputs(TINY_CONFIG, batch=batch, seed=seed)
        with torch.no_grad():
            reference = result.graph_module(x, t, y).numpy()
        match = agreement(ort_out, reference)
        assert match.rel_l2 <= FLOAT16_REL_L2_TOLERANCE and match.max_error <= FLOAT16_MAX_ERROR_TOLERANCE, \
            match.describe()
        assert match.rel_l2 > 1e-6  # it really computes in float16 (float32 would agree to ~1e-7)
    assert artifact.manifest["numerics"]["float16_floor"] == {"relative_l2": FLOAT16_REL_L2_TOLERANCE,
                                                              "max_error": FLOAT16_MAX_ERROR_TOLERANCE}


@pytest.mark.parametrize("target", TARGETS)
def test_each_layer_becomes_the_kernel_of_its_target(compiled, target):
    artifact, _ = compiled[target]
    records = {key: LayerRecord.from_manifest(data) for key, data in artifact.manifest["layers"].items()}
    assert len(records) == LAYERS_PER_BLOCK * TINY_CONFIG["num_layers"]
    if target == "tensorrt":
        kernels = tensorrt_kernels(onnx.load(artifact.model_path), records)
    else:
        kernels = fusion_report(artifact.model_path, records).layer_ops
    assert kernels == {key: EXPECTED_KERNEL[target][record.role] for key, record in records.items()}


def tensorrt_kernels(model: onnx.ModelProto, records: dict) -> dict[str, str]:
    """Per layer: 'Q/DQ MatMul' when every reader of its weight is DequantizeLinear -> MatMul whose other input
    is DequantizeLinear(QuantizeLinear(x)), else what was found."""
    nodes = list(all_nodes(model.graph))
    producer = {out: n for n in nodes for out in n.output}
    readers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    kernels = {}
    for key, record in records.items():
        found = set()
        for name in [n for n in readers if n == record.weight or n.startswith(f"{record.weight}__group")]:
            for dq in readers[name]:
                for matmul in readers.get(dq.output[0], []):
                    x_dq = producer.get(matmul.input[0])
                    x_q = producer.get(x_dq.input[0]) if x_dq is not None else None
                    ok = dq.op_type == "DequantizeLinear" and matmul.op_type == "MatMul" and \
                        x_dq.op_type == "DequantizeLinear" and x_q is not None and x_q.op_type == "QuantizeLinear"
                    found.add("Q/DQ MatMul" if ok else f"{dq.op_type} -> {matmul.op_type}")
        kernels[key] = found.pop() if len(found) == 1 else str(sorted(found))
    return kernels


def test_no_qdq_is_left_on_a_cuda_linear_and_attention_is_fused(compiled):
    artifact, _ = compiled["cuda"]
    model = onnx.load(artifact.model_path)
    ops = Counter(n.op_type for n in all_nodes(model.graph))
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0
    assert ops["MatMulNBits"] == LAYERS_PER_BLOCK * TINY_CONFIG["num_layers"]
    assert ops["MultiHeadAttention"] == TINY_CONFIG["num_layers"] and ops["Softmax"] == 0
    producer = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            block = attrs["block_size"]
            assert attrs["bits"] == 8 and block >= 16 and block & (block - 1) == 0  # a power of two >= 16
            assert producer[node.input[0]].op_type != "DequantizeLinear"  # a float activation, no Q/DQ pair
    # the timestep sinusoids stay float32 (their argument reaches 999); everything else computed in float16
    precision = {n.op_type: {p.key: p.value for p in n.metadata_props}.get(PRECISION_KEY)
                 for n in model.graph.node if n.op_type in ("Sin", "Cos", "LayerNormalization", "MultiHeadAttention")}
    assert precision == {"Sin": "float32", "Cos": "float32", "LayerNormalization": None, "MultiHeadAttention": None}
    notes = artifact.manifest["lowering"]["notes"]["float16"]
    assert set(notes["fragile_max_abs"]) == {"LayerNormalization", "Softmax", "adaLN modulation"}
    assert all(0 < peak < notes["limit"] for peak in notes["fragile_max_abs"].values())


def test_tensorrt_quantizers_are_symmetric_and_each_group_has_its_own_model(compiled):
    artifact, _ = compiled["tensorrt"]
    names = [p.name for p in artifact.group_model_paths]
    assert names == ["model.group0.onnx", "model.group1.onnx"] and set(names) <= set(artifact.manifest["files"])
    for path in [artifact.model_path, *artifact.group_model_paths]:
        model = onnx.load(path)
        initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        quantizers = [n for n in all_nodes(model.graph) if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert quantizers
        for node in quantizers:
            zero = initializers[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), node.name
        ops = {n.op_type for n in all_nodes(model.graph)}
        assert not ops & {"SplitToSequence", "SequenceAt"}  # TensorRT's parser has neither
        if path != artifact.model_path:  # what TensorRT cannot take: the If/NonZero row dispatch
            assert not ops & {"If", "NonZero", "GatherND", "ScatterND"}
    # ditq's runtime picks each row's group model exactly as model.onnx's If dispatch does
    batch = feeds(4, 5)
    batch["timestep"] = np.array([10, 990, 500, 499], dtype=np.int64)
    whole = artifact.session("cpu").run(["out"], batch)[0]
    by_group = artifact.denoise_by_group(artifact.group_model_paths,
                                         (batch["sample"], batch["timestep"], batch["class_labels"]), "cpu")
    np.testing.assert_allclose(by_group, whole, rtol=0, atol=1e-6)


def test_lower_a_cpu_artifact_to_each_target_and_back(compiled, tmp_path):
    from ditq_compiler.relower import relower

    source, _ = compiled["cpu"]
    original = onnx.load(source.model_path)
    same = relower(source.path, "cpu", tmp_path / "cpu")
    assert model_signature(onnx.load(same.model_path)) == model_signature(original)  # the same cpu model
    assert same.manifest["numerics"]["relative_l2"] == 0.0 and same.manifest["numerics"]["enforced"]
    for target in ("cuda", "tensorrt"):
        lowered = relower(source.path, target, tmp_path / target)
        assert lowered.manifest["target"] == target and lowered.manifest["relowered_from"]["target"] == "cpu"
        onnx.checker.check_model(onnx.load(lowered.model_path), full_check=True)
        ops = Counter(n.op_type for n in all_nodes(onnx.load(lowered.model_path).graph))
        if target == "cuda":
            assert ops["QuantizeLinear"] == 0 and ops["MatMulNBits"] == 14
            assert set(lowered.manifest["fusion"]["kernels"]) == {"MatMulNBits"}
        else:
            assert ops["QuantizeLinear"] == 5 * TINY_CONFIG["num_layers"]
            assert "converted" in lowered.manifest["numerics"]["why"]
        # the numerics changed on purpose, and not by much (measured: 1.7e-3 cuda, 2.6e-3 tensorrt)
        assert 0 < lowered.manifest["numerics"]["relative_l2"] < 0.02


def model_signature(model: onnx.ModelProto):
    """Initializers (name -> bytes) and the ordered node list (op, domain, attributes, input names), without the
    names of intermediate tensors."""
    initializers = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    nodes = []
    for node in all_nodes(model.graph):
        attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute
                             if a.type != onnx.AttributeProto.GRAPH))
        nodes.append((node.op_type, node.domain, attrs, tuple(i for i in node.input if i in initializers)))
    return initializers, Counter(nodes)


def test_a_cuda_artifact_cannot_be_raised(compiled, tmp_path, capsys):
    from ditq_compiler.cli import main

    artifact, _ = compiled["cuda"]
    assert main(["lower", str(artifact.path), "--target", "cpu", "-o", str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop_activation_quantizers has no inverse" in err[0]


def test_every_cpu_lowering_pass_has_an_inverse():
    layers = {"l": LayerRecord("w", "int8", "float", "qkv")}
    for forward in target_passes("cpu", layers):
        assert forward.name in INVERSES, f"register the inverse of {forward.name} in lowering/canonical.py"
        assert forward.inverse().name != forward.name


# ---------------------------------------------------------------------------------------------
# Each inverse on a graph built in code: canonical -> cpu lowering -> raise == canonical
# ---------------------------------------------------------------------------------------------

def canonical_linear(weight: np.ndarray, weight_dtype=TensorProto.INT8) -> onnx.ModelProto:
    """``out = DQ(Q(x)) @ DQ(W) + b``: one quantized linear in the fx exporter's canonical form."""
    k, n = weight.shape
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(weight, "l.weight_quantized"),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, n).astype(np.float32), "l.weight_scale"),
             numpy_helper.from_array(np.zeros(n, np.int8), "l.weight_zero_point"),
             numpy_helper.from_array(np.float32(0.05), "l.input_scale"),
             numpy_helper.from_array(np.uint8(128), "l.input_zero_point"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "l.bias")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "l.input_scale", "l.input_zero_point"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "l.input_scale", "l.input_zero_point"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["l.weight_quantized", "l.weight_scale", "l.weight_zero_point"],
                              ["w_dq"], axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["mm"], name="node_matmul"),
             helper.make_node("Add", ["mm", "l.bias"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["out"], {"x": x})[0]


@pytest.mark.parametrize("weight_format", ["int8", "int4", "fp4-e2m1"])
def test_raising_undoes_the_cpu_lowering_of_one_linear(weight_format):
    rng = np.random.default_rng(1)
    if weight_format.startswith("fp4"):
        from ditq_compiler.grids import GRIDS

        table = GRIDS["e2m1"].lookup_table().numpy()
        weight = table[rng.integers(0, 16, (16, 8))].astype(np.int8)
    else:
        bound = 7 if weight_format == "int4" else 63
        weight = rng.integers(-bound, bound + 1, (16, 8)).astype(np.int8)
    canonical = canonical_linear(weight)
    layers = {"l": LayerRecord("l.weight_quantized", weight_format, "float", "qkv")}
    cpu = lower(canonical, "cpu", layers)
    ops = Counter(n.op_type for n in cpu.model.graph.node)
    assert ops["MatMulIntegerToFloat"] == 1 and ops["MatMul"] == 0  # the bias fold ran
    expected_cast = {"int8": 0, "int4": 1, "fp4-e2m1": 1}[weight_format]
    assert ops["Cast"] == expected_cast
    raised = raise_to_canonical(cpu.model, [r.name for r in cpu.records], layers)
    assert model_signature(raised.model)[0] == model_signature(canonical)[0]  # the same initializers
    assert Counter(n.op_type for n in raised.model.graph.node) == Counter(n.op_type for n in canonical.graph.node)
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    np.testing.assert_allclose(run(raised.model, x), run(canonical, x), rtol=1e-6, atol=1e-6)
    again = lower(raised.model, "cpu", layers)  # and lowering it again gives the cpu model back
    assert model_signature(again.model) == model_signature(cpu.model)


def test_fp4_weights_of_each_group_are_packed_with_that_groups_grid():
    """FP4 picks its grid per layer and timestep group: a group's copy of the weight (``<weight>__group<g>``) is
    packed with that group's grid, and the lowered model still computes the canonical one exactly."""
    from ditq_compiler.grids import GRIDS

    rng = np.random.default_rng(3)
    table = GRIDS["int4"].lookup_table().numpy()
    weight = table[rng.integers(0, 16, (16, 8))].astype(np.int8)  # -7..7: off the e2m1 grid (5 and 7)
    assert np.isin(weight, [5, -5, 7, -7]).any()
    canonical = canonical_linear(weight)
    for tensor in canonical.graph.initializer:  # the stitcher's name for group 1's copy
        if tensor.name == "l.weight_quantized":
            tensor.name = "l.weight_quantized__group1"
    for node in canonical.graph.node:
        node.input[:] = ["l.weight_quantized__group1" if i == "l.weight_quantized" else i for i in node.input]
    record = LayerRecord("l.weight_quantized", "fp4-e2m1", "float", "qkv", group_formats=("fp4-e2m1", "fp4-int4"))
    assert record.format_of("l.weight_quantized__group1") == "fp4-int4"
    # a copy stored once holds group 0's values too, so group 0's grid represents it
    assert record.format_of("l.weight_quantized") == "fp4-e2m1"
    assert LayerRecord.from_manifest(record.to_manifest()) == record
    assert "group_formats" not in LayerRecord("w", "int8", "float", "qkv").to_manifest()
    cpu = lower(canonical, "cpu", {"l": record})
    lookups = [t.name for t in cpu.model.graph.initializer if t.name.startswith("ditq.fp4_lookup.")]
    assert lookups == ["ditq.fp4_lookup.int4"]
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    np.testing.assert_allclose(run(cpu.model, x), run(canonical, x), rtol=1e-5, atol=1e-5)


def test_raising_undoes_the_fp8_weight_cast():
    import ml_dtypes

    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 8)).astype(ml_dtypes.float8_e4m3fn)
    k, n = weight.shape
    inits = [numpy_helper.from_array(rng.uniform(0.01, 0.02, n).astype(np.float32), "l.weight_scale")]
    w = helper.make_tensor("l.weight_quantized", TensorProto.FLOAT8E4M3FN, weight.shape,
                           weight.view(np.uint8).tobytes(), raw=True)
    nodes = [helper.make_node("DequantizeLinear", ["l.weight_quantized", "l.weight_scale"], ["w_dq"], axis=1),
             helper.make_node("MatMul", ["x", "w_dq"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, n])], [w, *inits])
    canonical = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    canonical.ir_version = 10
    layers = {"l": LayerRecord("l.weight_quantized", "float8e4m3fn", "float", "qkv")}
    cpu = lower(canonical, "cpu", layers)
    assert {n.op_type for n in cpu.model.graph.node} == {"Cast", "Mul", "MatMul"}
    raised = raise_to_canonical(cpu.model, [r.name for r in cpu.records], layers)
    assert [n.op_type for n in raised.model.graph.node] == ["DequantizeLinear", "MatMul"]
    assert layers["l"].weight == "l.weight_quantized"  # the record points at the fp8 weight again
    x = rng.standard_normal((2, k)).astype(np.float32)
    np.testing.assert_allclose(run(raised.model, x), run(cpu.model, x), rtol=1e-6, atol=1e-6)


def test_cuda_weights_are_exact_in_matmul_nbits():
    """MatMulNBits with the packed weight and repeated per-channel scales computes x W_q diag(s) exactly (up to
    float32 summation order), 4 and 8 bits, K not a multiple of the block."""
    from ditq_compiler.exporters.lowering.cuda import block_size_for

    rng = np.random.default_rng(3)
    for weight_format, bound, k in (("int8", 127, 40), ("int4", 7, 200)):
        weight = rng.integers(-bound, bound + 1, (k, 24)).astype(np.int8)
        canonical = canonical_linear(weight)
        for node in canonical.graph.node:  # weight-only: drop the activation Q/DQ, as a cuda compile writes
            if node.op_type == "MatMul":
                node.input[0] = "x"
        layers = {"l": LayerRecord("l.weight_quantized", weight_format, "float", "qkv")}
        cuda = lower(canonical, "cuda", layers, context=LoweringContext())
        nbits = [n for n in cuda.model.graph.node if n.op_type == "MatMulNBits"]
        attrs = {a.name: helper.get_attribute_value(a) for a in nbits[0].attribute}
        assert attrs["bits"] == (4 if weight_format == "int4" else 8) and attrs["block_size"] == block_size_for(k)
        x = rng.standard_normal((2, 3, k)).astype(np.float32)
        parameters = {t.name: numpy_helper.to_array(t) for t in canonical.graph.initializer}
        reference = x.astype(np.float64) @ (weight * parameters["l.weight_scale"]) + parameters["l.bias"]
        # (not ONNX Runtime on the canonical graph: its CPU provider fuses a float-input DQ + MatMul into its own
        # MatMulNBits, which quantizes the activations blockwise: 5e-3 off)
        match = agreement(run(cuda.model, x), reference)
        assert match.rel_l2 < 1e-3 and match.max_error < 1e-3, match.describe()  # float16 inputs and scales


# ---------------------------------------------------------------------------------------------
# Runtime: provider choice and the command line
# ---------------------------------------------------------------------------------------------

def test_auto_provider_follows_the_target_and_says_when_it_cannot(compiled, tmp_path, capsys):
    from ditq_compiler.cli import main
    from ditq_compiler.runtime import cuda_usable, resolve_provider

    assert resolve_provider("auto", "cpu").provider == "cpu" and resolve_provider("auto", "cpu").note == ""
    if not cuda_usable()[0]:
        choice = resolve_provider("auto", "cuda")
        assert choice.provider == "cpu" and "cuda:" in choice.note and "slow" in choice.note
        artifact, _ = compiled["cuda"]
        assert main(["run", str(artifact.path), "--steps", "2", "--class-labels", "1", "-o",
                     str(tmp_path / "s.npz")]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ditq run: --provider auto: running on cpu")
        assert main(["run", str(artifact.path), "--provider", "tensorrt", "-o", str(tmp_path / "t.npz")]) == 2
        assert "--provider tensorrt:" in capsys.readouterr().err


def test_the_command_line_compiles_for_a_target_and_lowers(tiny_dit_dir, tmp_path, capsys):
    from ditq_compiler.cli import main

    art = tmp_path / "w4-cuda"
    assert main(["compile", str(tiny_dit_dir), "-o", str(art), "--format", "w4a8", "--target", "cuda",
                 "--calib-steps", "4", "--calib-samples", "2"]) == 0
    assert "14 fused by ONNX Runtime into integer kernels: {'MatMulNBits': 14}" in capsys.readouterr().out
    model = onnx.load(art / "model.onnx")
    assert {helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"} == {4}
    with pytest.raises(SystemExit) as exit_info:  # argparse's own one-line error
        main(["compile", str(tiny_dit_dir), "-o", str(tmp_path / "x"), "--target", "tpu"])
    assert exit_info.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# GPU (skipped where no provider starts)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("target", ["cuda", "tensorrt"])
def test_on_the_gpu_provider(compiled, target):
    from ditq_compiler.runtime import provider_usable

    usable, why = provider_usable(target)
    if not usable:
        pytest.skip(f"no {target} provider here: {why}")
    artifact, _ = compiled[target]
    reference = artifact.denoise(feeds(2, 7)["sample"], feeds(2, 7)["timestep"], feeds(2, 7)["class_labels"],
                                 provider="cpu")
    batch = feeds(2, 7)
    got = artifact.denoise(batch["sample"], batch["timestep"], batch["class_labels"], provider=target)
    assert agreement(got, reference).rel_l2 < 2e-2  # float16 kernels vs the same artifact on the CPU


def test_gpu_benchmark_is_import_safe_and_says_when_there_is_no_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"
    done = subprocess.run([sys.executable, str(script), "--rows", "ditq cuda W8", "--batches", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    if "no NVIDIA GPU found" not in done.stdout:
        assert "wrote the GPU section" in done.stdout
