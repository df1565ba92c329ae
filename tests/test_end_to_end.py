"""End to end on a tiny diffusers DiT: compile, check the ONNX graph and what ONNX Runtime fuses,
and compare outputs with the torch fake-quant graph and with the FP model."""

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import LAYERS_PER_BLOCK, TINY_CONFIG, make_tiny_dit
from ditq_compiler import Artifact
from ditq_compiler.errors import ArtifactError, TimestepError
from ditq_compiler.exporters import FUSED_INT8_OPS, fusion_report, optimized_model
from ditq_compiler.numerics import agreement
from conftest import example_inputs


def test_artifact_layout_and_manifest(compiled_tiny, tiny_dit_dir):
    artifact, _ = compiled_tiny
    assert sorted(p.name for p in artifact.path.iterdir()) == ["compile_log.json", "manifest.json", "model.onnx"]
    manifest = artifact.manifest
    for key in ("format_version", "model", "source", "format", "recipe", "timestep_groups", "scheduler",
                "inputs", "outputs", "ditq_version", "seed"):
        assert key in manifest, key
    assert manifest["format"] == "w8a8" and manifest["recipe"] == "minmax"
    assert manifest["model"]["class"] == "DiTTransformer2DModel"
    assert manifest["timestep_groups"] == [{"index": 0, "start": 0, "end": 999}]
    assert list(manifest["inputs"]) == ["sample", "timestep", "class_labels"]
    assert list(manifest["outputs"]) == ["out"]
    import hashlib

    digest = hashlib.sha256()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        digest.update(name.encode())
        digest.update((tiny_dit_dir / name).read_bytes())
    assert manifest["source"]["sha256"] == digest.hexdigest()


def test_onnx_checker_inputs_and_integer_initializers(compiled_tiny):
    artifact, _ = compiled_tiny
    model = onnx.load(artifact.model_path)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["sample", "timestep", "class_labels"] and [o.name for o in model.graph.output] == ["out"]
    assert inputs["sample"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inputs["timestep"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert inputs["sample"].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    initializers = {i.name: i for i in model.graph.initializer}
    layers = artifact.manifest["quantized_layers"]
    assert len(layers) == LAYERS_PER_BLOCK * TINY_CONFIG["num_layers"]
    for layer in layers:
        assert initializers[f"{layer}.weight_quantized"].data_type == onnx.TensorProto.INT8
        assert f"{layer}.weight" not in initializers  # no float copy of a quantized weight
    ops = [n.op_type for n in model.graph.node]
    # one per quantized tensor: 5 linear inputs per block (attention in float: --quantize-attention is opt-in)
    assert ops.count("QuantizeLinear") == 5 * TINY_CONFIG["num_layers"]


def test_onnx_runtime_fuses_every_quantized_layer(compiled_tiny):
    artifact, _ = compiled_tiny
    layers = artifact.manifest["quantized_layers"]
    report = fusion_report(artifact.model_path, artifact.manifest["quantized_weights"])
    assert report.all_fused, report.unfused
    assert set(report.layer_ops.values()) <= FUSED_INT8_OPS
    # the adaLN modulation (2-d input) becomes QGemm, the token-wise linears MatMulIntegerToFloat
    assert report.layer_ops["transformer_blocks.0.norm1.linear"] == "QGemm"
    assert report.layer_ops["transformer_blocks.0.attn1.to_q"] == "MatMulIntegerToFloat"
    # and no float MatMul/Gemm is left reading a dequantized weight
    optimized = optimized_model(artifact.model_path)
    producers = {out: node for node in optimized.graph.node for out in node.output}
    for node in optimized.graph.node:
        if node.op_type in ("MatMul", "Gemm", "FusedMatMul"):
            for name in node.input:
                producer = producers.get(name)
                assert producer is None or producer.op_type != "DequantizeLinear", node.name
    assert artifact.manifest["fusion"]["fused_layers"] == len(layers)


def test_onnx_runtime_matches_the_torch_fake_quant_graph_and_fp(compiled_tiny):
    artifact, result = compiled_tiny
    session = artifact.session("cpu")
    fp_model = make_tiny_dit()
    for batch, seed in ((1, 3), (4, 4)):  # dynamic batch
        x, t, y = example_inputs(TINY_CONFIG, batch=batch, seed=seed)
        ort_out = session.run(["out"], {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()})[0]
        with torch.no_grad():
            fake_quant = result.graph_module(x, t, y).numpy()
            fp = fp_model(x, t, y).sample.numpy()
        # Same integer arithmetic: float reassociation and rare one-step rounding flips only
        # (ditq_compiler/numerics.py states the tolerance; measured here: 5e-7 of the range).
        match = agreement(ort_out, fake_quant)
        assert match.ok, match.describe()
        # W8A8 vs FP on this random tiny model: relative L2 below 1% (measured 0.35%)
        assert np.linalg.norm(ort_out - fp) / np.linalg.norm(fp) < 0.01


def test_artifact_sampling_runs_and_rejects_out_of_range_timesteps(compiled_tiny):
    artifact, _ = compiled_tiny
    samples = artifact.sample([1, 3], steps=4, seed=0, provider="cpu")
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
    x, _, y = example_inputs(TINY_CONFIG, batch=2)
    with pytest.raises(TimestepError, match="timestep 1000 is outside the scheduler's range"):
        artifact.denoise(x.numpy(), np.array([5, 1000]), y.numpy(), provider="cpu")
    with pytest.raises(TimestepError, match="timestep -1"):
        artifact.denoise(x.numpy(), np.array([-1, 3]), y.numpy(), provider="cpu")


def test_failed_compile_leaves_no_artifact_and_keeps_the_old_one(compiled_tiny, tiny_dit_dir, fast_config,
                                                                  tmp_path, monkeypatch):
    import shutil

    from ditq_compiler import compile as compile_checkpoint

    good = tmp_path / "artifact"
    shutil.copytree(compiled_tiny[0].path, good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ditq_compiler.exporters.save_onnx", fail)
    with pytest.raises(OSError, match="disk full"):
        compile_checkpoint(tiny_dit_dir, good, fast_config)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no staging directory left
    with pytest.raises(OSError):
        compile_checkpoint(tiny_dit_dir, tmp_path / "new", fast_config)
    assert not (tmp_path / "new").exists()


def test_loading_a_non_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a ditq artifact"):
        Artifact.load(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        Artifact.load(tmp_path)


def test_a_layer_called_twice_gets_one_qdq_pair_per_input(tiny_dit_dir, tmp_path):
    """diffusers' DiT runs block 0's timestep embedder twice (block 0 and the final layer): quantizing it
    must give each call its own activation parameters and keep both numerically right."""
    from ditq_compiler import CalibrationConfig, CompileConfig, LayerRule
    from ditq_compiler.pipeline import compile_with_result

    config = CompileConfig(calibration=CalibrationConfig(steps=4, samples=2),
                           layer_rules=(LayerRule("transformer_blocks.0.norm1.emb.timestep_embedder.*", True),))
    artifact, result = compile_with_result(tiny_dit_dir, tmp_path / "art", config)
    gm = result.graph_module.graph_modules()[0]
    first = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"
    assert hasattr(gm.get_submodule(first), "input_scale")
    assert hasattr(gm.get_submodule(first + "#1"), "input_scale")  # the second call's own quantizer
    weights = artifact.manifest["quantized_weights"]
    assert first in weights and first + "#1" in weights
    # one float weight, one weight scale: both calls read one int8 tensor, under one name
    assert weights[first] == weights[first + "#1"]
    report = fusion_report(artifact.model_path, weights)
    assert report.layer_ops[first] == report.layer_ops[first + "#1"] == "QGemm"  # 2-d input: [batch, 256]
    assert report.readers[first] == 2  # the same initializer feeds both calls' kernels
    x, t, y = example_inputs(TINY_CONFIG, batch=2, seed=11)
    got = artifact.session("cpu").run(["out"], {"sample": x.numpy(), "timestep": t.numpy(),
                                                "class_labels": y.numpy()})[0]
    with torch.no_grad():
        expected = result.graph_module(x, t, y).numpy()
    assert agreement(got, expected).ok
    assert artifact.manifest["fusion"]["unfused"] == {}


def test_large_models_use_external_data(tiny_dit_dir, fast_config, tmp_path, monkeypatch):
    """Over 2 GB the weights go to model.onnx.data; the threshold is lowered here to exercise that path."""
    from ditq_compiler import compile as compile_checkpoint
    from ditq_compiler.exporters import onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GIB", 10_000)
    artifact = compile_checkpoint(tiny_dit_dir, tmp_path / "art", fast_config)
    assert artifact.manifest["files"] == ["model.onnx", "model.onnx.data"]
    assert (artifact.path / "model.onnx.data").stat().st_size > (artifact.path / "model.onnx").stat().st_size
    assert artifact.manifest["fusion"]["unfused"] == {}
    x, t, y = example_inputs(TINY_CONFIG, batch=2, seed=1)
    assert np.isfinite(artifact.denoise(x.numpy(), t.numpy(), y.numpy(), provider="cpu")).all()


def test_full_range_weights_are_exact_on_any_cpu(tiny_dit_dir, tmp_path):
    """Full-range int8 weights: where this CPU's u8 x s8 kernels saturate (no VNNI/AMX), the artifact runs in
    ONNX Runtime's exact U8U8 mode and the compile's numeric check passes; without that mode it would not."""
    import onnxruntime as ort

    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler.cpu import u8s8_saturates
    from ditq_compiler.pipeline import compile_with_result

    config = CompileConfig(calibration=CalibrationConfig(steps=4, samples=2), weight_range="full")
    artifact, result = compile_with_result(tiny_dit_dir, tmp_path / "art", config)
    assert artifact.manifest["weight_range"] == "full" and artifact.manifest["numerics"]["groups"]
    x, t, y = example_inputs(TINY_CONFIG, batch=4, seed=2)
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()}
    with torch.no_grad():
        expected = result.graph_module(x, t, y).numpy()
    assert agreement(artifact.session("cpu").run(["out"], feeds)[0], expected).ok
    if u8s8_saturates():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        plain = ort.InferenceSession(str(artifact.model_path), options, providers=["CPUExecutionProvider"])
        assert not agreement(plain.run(["out"], feeds)[0], expected).ok  # the saturation is real here
