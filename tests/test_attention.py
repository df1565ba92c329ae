"""Integer attention: q, k, v and the softmax output quantized so ONNX Runtime runs QK^T and PV on its integer
kernels, per timestep group, composing with the smoothing folds."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from conftest import TINY_CONFIG
from test_targets import all_nodes
from ditq_compiler import CalibrationConfig, CompileConfig
from ditq_compiler.errors import ConfigError
from ditq_compiler.exporters.lowering import LayerRecord, raise_to_canonical
from ditq_compiler.exporters.ort_inspect import INTEGER_ATTENTION_OPS, attention_kernels
from ditq_compiler.numerics import agreement
from ditq_compiler.qspec import ATTENTION_KEY
from conftest import example_inputs

CALIB = CalibrationConfig(steps=6, samples=2)
LAYERS = [f"transformer_blocks.{i}.attn1" for i in range(TINY_CONFIG["num_layers"])]


@pytest.fixture(scope="module")
def attention_artifacts(tmp_path_factory):
    from test_smoothing import modulated_dit

    from ditq_compiler.pipeline import compile_with_result

    path = tmp_path_factory.mktemp("attention_dit")
    modulated_dit().save_pretrained(path, safe_serialization=True)
    built = {}
    for name, kwargs in (("plain", dict(quantize_attention=True)),
                         ("smoothquant-3", dict(recipe="smoothquant", groups=3, grouping="uniform",
                                                quantize_attention=True)),
                         ("off", dict(groups=2, grouping="uniform"))):
        built[name] = compile_with_result(path, tmp_path_factory.mktemp(name) / "art", CompileConfig(
            calibration=CALIB, **kwargs))
    return built


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "smoothquant-3"])
def test_both_products_run_on_integer_kernels_in_every_branch(attention_artifacts, name):
    artifact, result = attention_artifacts[name]
    kernels = attention_kernels(artifact.model_path, LAYERS)
    assert all(set(k.values()) <= INTEGER_ATTENTION_OPS for k in kernels.values()), kernels
    assert artifact.manifest["fusion"]["attention"]["layers"] == len(LAYERS)
    assert artifact.manifest["quantize_attention"] is True
    x, _, y = example_inputs(TINY_CONFIG, batch=3, seed=7)
    for group, branch in zip(result.context.timestep_groups, result.graph_module.graph_modules()):
        t = torch.tensor([group.start, (group.start + group.end) // 2, group.end])
        with torch.no_grad():
            expected = branch(x, t, y).numpy()
        got = artifact.session("cpu").run(["out"], {"sample": x.numpy(), "timestep": t.numpy(),
                                                    "class_labels": y.numpy()})[0]
        assert agreement(got, expected).ok, (name, group)
        # every graph op that remains float in the attention core: the softmax (QLinearSoftmax is slower)
        assert not any(node.target is torch.ops.aten.scaled_dot_product_attention.default
                       for node in branch.graph.nodes)


@pytest.mark.slow
def test_float_attention_runs_as_multi_head_attention_in_every_branch(attention_artifacts):
    """Without --quantize-attention the CPU lowering fuses each float attention of each timestep group's branch
    into com.microsoft.MultiHeadAttention, and ONNX Runtime's optimized graph runs every one. Raising that
    fusion alone gives back the MatMul/Softmax/MatMul attention, which computes the same up to float rounding
    (relative L2 at most 1e-6; measured about 1e-7)."""
    artifact, result = attention_artifacts["off"]
    fused = len(LAYERS) * len(result.context.timestep_groups)
    assert len(result.context.timestep_groups) == 2
    assert artifact.manifest["fusion"]["attention"] == {"nodes": fused, "kernels": {"MultiHeadAttention": fused}}
    model = onnx.load(artifact.model_path)
    ops = Counter(node.op_type for node in all_nodes(model.graph))
    assert ops["MultiHeadAttention"] == fused and ops["Softmax"] == 0
    layers = {key: LayerRecord.from_manifest(data) for key, data in artifact.manifest["layers"].items()}
    unfused = raise_to_canonical(model, ["fuse_multi_head_attention"], layers).model
    ops = Counter(node.op_type for node in all_nodes(unfused.graph))
    assert ops["MultiHeadAttention"] == 0 and ops["Softmax"] == fused
    x, _, y = example_inputs(TINY_CONFIG, batch=3, seed=8)
    sessions = [ort_session(m) for m in (model, unfused)]
    for group in result.context.timestep_groups:
        feeds = {"sample": x.numpy(), "timestep": np.array([group.start, group.end] * 2)[:3],
                 "class_labels": y.numpy()}
        fused_out, unfused_out = (session.run(["out"], feeds)[0] for session in sessions)
        assert agreement(fused_out, unfused_out).rel_l2 <= 1e-6, group


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_attention_quantization_is_off_by_default(attention_artifacts):
    artifact, result = attention_artifacts["off"]
    assert artifact.manifest["quantize_attention"] is False
    gm = result.graph_module.graph_modules()[0]
    assert sum(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes) == len(LAYERS)


def test_decomposed_attention_is_the_attention():
    """Q/DQ insertion's decomposition, with the quantizers made the identity (scales so fine no value
    moves), computes what scaled_dot_product_attention computes."""
    from ditq_compiler.passes.attention import InsertAttentionQDQ  # noqa: F401  (the decomposition's module)

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    c = 1 / 8 ** 0.5
    ours = torch.softmax((q * c) @ k.transpose(-2, -1), dim=-1) @ v
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_v_statistics_follow_the_fold_into_v():
    """The fold into V changes V; its recorded ranges follow exactly (observed anew, they agree)."""
    from test_smoothing import _random_plan, _split, modulated_dit

    from ditq_compiler.context import CompileContext
    from ditq_compiler.passes import CollectActivationStats, FoldSmoothing

    module, ctx = _split(modulated_dit(), groups=1, config_kwargs=dict(quantize_attention=True))
    gm = module.graph_modules()[0]
    assert sum(ATTENTION_KEY in n.meta for n in gm.graph.nodes) == len(LAYERS)
    ctx.smoothing_plan = _random_plan(module, ctx, ("attn_out",), with_shift=True)
    FoldSmoothing("skip").run(module, ctx)
    observed = CompileContext(ctx.config, ctx.model_config, ctx.scheduler_config, ctx.check_inputs)
    CollectActivationStats().run(gm, observed)
    for layer in LAYERS:
        derived, seen = ctx.branches[0].stats.get(f"{layer}:v"), observed.stats.get(f"{layer}:v")
        for t in derived.timesteps:
            scale = float(seen.per_timestep[t].channel_max.abs().max())
            assert np.allclose(derived.per_timestep[t].channel_min, seen.per_timestep[t].channel_min, atol=1e-5 * scale)
            assert np.allclose(derived.per_timestep[t].channel_max, seen.per_timestep[t].channel_max, atol=1e-5 * scale)


def test_gpu_targets_refuse_attention_quantization():
    with pytest.raises(ConfigError, match="--quantize-attention runs on the cpu target only"):
        CompileConfig(target="cuda", quantize_attention=True).attention_spec
    assert CompileConfig(target="cuda").attention_spec is None
    assert CompileConfig().attention_spec is None  # opt-in: it costs PSNR on the reference model
    assert CompileConfig(quantize_attention=True).attention_spec is not None


@pytest.mark.parametrize("options", [dict(format="fp8"), dict(act="dynamic")])
def test_attention_quantization_needs_static_integer_activations(options):
    with pytest.raises(ConfigError, match="--quantize-attention needs static integer activations"):
        CompileConfig(quantize_attention=True, **options).validate()


@pytest.mark.parametrize("precision, reason", [("fp", "its output projection keeps a float input"),
                                               ("fp8", "its output projection takes an FP8 input")])
def test_attention_is_declined_where_the_output_projection_has_no_integer_grid(precision, reason):
    """PV's integer kernel writes into the output projection's input grid: without one, attention stays float."""
    from test_smoothing import modulated_dit

    from ditq_compiler.config import LayerRule
    from ditq_compiler.context import CompileContext
    from ditq_compiler.passes import AnnotateLinearQuantization
    from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG
    from conftest import trace_dit

    model = modulated_dit()
    config = CompileConfig(calibration=CALIB, quantize_attention=True).with_rules(
        LayerRule("transformer_blocks.0.attn1.to_out.0", precision))
    inputs = example_inputs(dict(model.config), batch=2)
    gm = trace_dit(model, inputs)
    result = AnnotateLinearQuantization().run(gm, CompileContext(config, dict(model.config),
                                                                 dict(DEFAULT_SCHEDULER_CONFIG), inputs))
    annotated = [n.meta[ATTENTION_KEY].layer for n in gm.graph.nodes if ATTENTION_KEY in n.meta]
    assert annotated == LAYERS[1:]  # block 0's attention declined, block 1's kept
    assert any(line.startswith(f"keep fp   {LAYERS[0]} attention ({reason}") for line in result.details), \
        result.details
