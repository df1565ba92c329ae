"""Each pass: op counts, structure, and numerics against the graph before it, with stated tolerances."""

from collections import Counter

import pytest
import torch

from conftest import ATTENTION_TENSORS_PER_BLOCK, LAYERS_PER_BLOCK, QUANTIZED_INPUTS_PER_BLOCK, TINY_CONFIG, make_tiny_dit
from ditq_compiler import CalibrationConfig, CompileConfig, LayerRule
from ditq_compiler.calibration import TensorStats
from ditq_compiler.context import CompileContext
from ditq_compiler.errors import CalibrationError, PassPreconditionError
from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG
from ditq_compiler.pass_manager import NumericsMismatch, PassManager, PassResult, GraphPass
from ditq_compiler.passes import (AnnotateLinearQuantization, ChooseQuantParams, CollectActivationStats,
                                  GroupTimesteps, InsertQuantDequant, SplitTimestepGroups)
from ditq_compiler.qspec import PARAMS_KEY, PROVENANCE_KEY, SPEC_KEY
from conftest import example_inputs, trace_dit
from ditq_compiler.tracing import linear_sites

BLOCKS = TINY_CONFIG["num_layers"]
CONFIG = CompileConfig(calibration=CalibrationConfig(steps=5, samples=2))


def _traced(model=None, config=CONFIG):
    model = model or make_tiny_dit()
    inputs = example_inputs(dict(model.config), batch=2)
    gm = trace_dit(model, inputs)
    ctx = CompileContext(config, dict(model.config), dict(DEFAULT_SCHEDULER_CONFIG), inputs)
    return gm, ctx, model


def _ops(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _run(gm):
    with torch.no_grad():
        return gm(*example_inputs(TINY_CONFIG, batch=3, seed=5))


def test_trace_keeps_names_and_function():
    gm, ctx, model = _traced()
    layers = [site.layer for site in linear_sites(gm)]
    assert "transformer_blocks.1.attn1.to_q" in layers and "proj_out_2" in layers
    x, t, y = example_inputs(TINY_CONFIG, batch=3, seed=5)
    with torch.no_grad():
        assert torch.equal(gm(x, t, y), model(x, t, y).sample)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["sample", "timestep", "class_labels"]


def test_annotate_marks_block_linears_only_and_changes_no_code():
    gm, ctx, _ = _traced()
    code, before = gm.code, _run(gm)
    result = AnnotateLinearQuantization().run(gm, ctx)
    specs = [n.meta[SPEC_KEY] for n in gm.graph.nodes if SPEC_KEY in n.meta]
    assert result.modified and len(specs) == LAYERS_PER_BLOCK * BLOCKS
    assert {s.input_key for s in specs if s.layer.endswith(("to_q", "to_k", "to_v"))} == {
        specs[1].input_key, specs[1 + LAYERS_PER_BLOCK].input_key}  # q/k/v of a block read one tensor
    assert len({s.input_key for s in specs}) == QUANTIZED_INPUTS_PER_BLOCK * BLOCKS
    assert gm.code == code and torch.equal(_run(gm), before)
    assert any("keep fp   proj_out_1" in line for line in result.details)


def test_annotate_honours_rules():
    config = CONFIG.with_rules(LayerRule("transformer_blocks.1.*", False))
    gm, ctx, _ = _traced(config=config)
    AnnotateLinearQuantization().run(gm, ctx)
    layers = {n.meta[SPEC_KEY].layer for n in gm.graph.nodes if SPEC_KEY in n.meta}
    assert len(layers) == LAYERS_PER_BLOCK and all(name.startswith("transformer_blocks.0.") for name in layers)


def test_calibrate_keys_by_timestep_and_restores_the_graph():
    gm, ctx, _ = _traced(config=CompileConfig(calibration=CONFIG.calibration, quantize_attention=True))
    AnnotateLinearQuantization().run(gm, ctx)
    code, before = gm.code, _run(gm)
    result = CollectActivationStats().run(gm, ctx)
    gm.recompile()
    assert not result.modified and gm.code == code and torch.equal(_run(gm), before)
    assert not any("observer" in name for name, _ in gm.named_modules())
    from ditq_compiler.sampling import make_scheduler

    scheduler = make_scheduler(DEFAULT_SCHEDULER_CONFIG)
    scheduler.set_timesteps(5)
    expected = [int(t) for t in scheduler.timesteps]
    assert ctx.stats.timesteps == expected
    # the linears' inputs, and q, k, v of each attention call (the softmax output needs no statistics)
    assert len(ctx.stats.tensors) == (QUANTIZED_INPUTS_PER_BLOCK + ATTENTION_TENSORS_PER_BLOCK - 1) * BLOCKS
    for stats in ctx.stats.tensors.values():
        assert stats.timesteps == sorted(expected)
        lo, hi = stats.range_over()
        assert torch.all(lo <= hi)


def test_tensor_stats_file_rows_under_their_own_timestep():
    stats = TensorStats("x", ["layer"])
    x = torch.tensor([[[1.0, -2.0]], [[5.0, 0.5]], [[-3.0, 7.0]]])  # [batch 3, tokens 1, channels 2]
    stats.update(x, torch.tensor([10, 20, 10]))
    assert stats.timesteps == [10, 20]
    assert stats.per_timestep[10].channel_min.tolist() == [-3.0, -2.0]
    assert stats.per_timestep[10].channel_max.tolist() == [1.0, 7.0]
    assert stats.per_timestep[20].channel_max.tolist() == [5.0, 0.5]
    assert stats.per_timestep[10].rows == 2
    lo, hi = stats.range_over([20])
    assert lo.tolist() == [5.0, 0.5] and hi.tolist() == [5.0, 0.5]


def test_nan_in_calibration_is_reported_with_layer_and_timestep():
    model = make_tiny_dit()
    with torch.no_grad():
        model.transformer_blocks[1].attn1.to_out[0].weight[0, 0] = float("nan")
    gm, ctx, _ = _traced(model)
    AnnotateLinearQuantization().run(gm, ctx)
    with pytest.raises(CalibrationError, match=r"non-finite activation .* transformer_blocks\.1\.ff\.net\.0\.proj"):
        CollectActivationStats().run(gm, ctx)
    assert not any("observer" in name for name, _ in gm.named_modules())


def _calibrated(config=CONFIG):
    """Annotated, calibrated and split into one branch (the module every recipe pass works on)."""
    gm, ctx, model = _traced(config=config)
    AnnotateLinearQuantization().run(gm, ctx)
    CollectActivationStats().run(gm, ctx)
    GroupTimesteps(config.groups, config.grouping).run(gm, ctx)
    module = SplitTimestepGroups().run(gm, ctx).graph_module
    return module, ctx, model


def test_params_cover_the_calibrated_range():
    module, ctx, _ = _calibrated()
    gm = module.graph_modules()[0]
    before = _run(gm)
    result = ChooseQuantParams("minmax").run(module, ctx)
    assert result.modified and torch.equal(_run(gm), before)
    weight_qmax = CONFIG.weight_spec.qmax
    for node in gm.graph.nodes:
        if SPEC_KEY not in node.meta:
            continue
        params = node.meta[PARAMS_KEY]
        lo, hi = ctx.stats.get(node.meta[SPEC_KEY].input_key).range_over()
        lo, hi = min(float(lo.min()), 0.0), max(float(hi.max()), 0.0)
        scale, zero_point = params.activation.scale, params.activation.zero_point
        assert scale == pytest.approx((hi - lo) / 255, rel=1e-6)
        assert (0 - zero_point) * scale == pytest.approx(lo, abs=scale / 2 + 1e-7)
        weight = gm.get_parameter(node.args[1].target)
        assert torch.allclose(params.weight_scale, weight.abs().amax(1) / weight_qmax)


def test_readers_of_one_tensor_share_one_activation_quantizer():
    module, ctx, _ = _calibrated()
    ChooseQuantParams("minmax").run(module, ctx)
    gm = module.graph_modules()[0]
    by_key = {}
    for node in gm.graph.nodes:
        if SPEC_KEY in node.meta:
            by_key.setdefault(node.meta[SPEC_KEY].input_key, set()).add(id(node.meta[PARAMS_KEY].activation))
    assert all(len(ids) == 1 for ids in by_key.values())
    # a recipe that gave q and k different parameters is refused at insertion, not silently merged
    import dataclasses

    to_k = next(n for n in gm.graph.nodes if SPEC_KEY in n.meta and n.meta[SPEC_KEY].layer.endswith("0.attn1.to_k"))
    params = to_k.meta[PARAMS_KEY]
    to_k.meta[PARAMS_KEY] = dataclasses.replace(
        params, activation=dataclasses.replace(params.activation, scale=params.activation.scale * 2))
    with pytest.raises(RuntimeError, match="to_k reads .* with other activation parameters"):
        InsertQuantDequant().run(module, ctx)


def test_recipe_needs_split_branches():
    gm, ctx, _ = _traced()
    AnnotateLinearQuantization().run(gm, ctx)
    with pytest.raises(PassPreconditionError, match="pass 'choose_params' cannot run: the graph is not split"):
        PassManager([ChooseQuantParams("minmax")]).run(gm, ctx)


def test_insert_qdq_counts_structure_and_numerics():
    module, ctx, _ = _calibrated()
    ChooseQuantParams("minmax").run(module, ctx)
    gm = module.graph_modules()[0]
    fp_out = _run(gm)
    result = InsertQuantDequant().run(module, ctx)
    gm.graph.lint()
    gm.recompile()
    ops = _ops(gm)
    quantized = LAYERS_PER_BLOCK * BLOCKS
    assert ops["ditq.quantize.default"] == QUANTIZED_INPUTS_PER_BLOCK * BLOCKS
    # one DQ per activation, per weight, and per int32 bias of the 2-d (adaLN) layers
    assert ops["ditq.dequantize.default"] == QUANTIZED_INPUTS_PER_BLOCK * BLOCKS + quantized + BLOCKS
    assert ops["aten.matmul.default"] == quantized
    assert ops["aten.linear.default"] == 22 - quantized  # embedders and final layer untouched
    # structure: each matmul reads (DQ(Q(x)), DQ(int8 weight)) and carries its provenance
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.matmul.default:
            x_dq, w_dq = node.args
            assert x_dq.target is torch.ops.ditq.dequantize.default
            assert x_dq.args[0].target is torch.ops.ditq.quantize.default
            assert gm.get_buffer(w_dq.args[0].target).dtype == torch.int8
            assert node.meta[PROVENANCE_KEY]["pass"] == "insert_qdq"
    for block in range(BLOCKS):
        to_q = gm.get_submodule(f"transformer_blocks.{block}.attn1.to_q")
        assert not hasattr(to_q, "weight") and to_q.weight_quantized.dtype == torch.int8
        assert to_q.input_zero_point.dtype == torch.uint8
        assert gm.get_submodule(f"transformer_blocks.{block}.norm1.linear").bias_quantized.dtype == torch.int32
    # numerics: W8A8 within 1% relative L2 of the FP output on this random model (measured 0.35%)
    q_out = _run(gm)
    error = float((q_out - fp_out).norm() / fp_out.norm())
    assert 0 < error < 0.01
    assert "10 activation Q/DQ pairs" in result.summary


def test_pass_manager_catches_a_pass_that_breaks_its_promise():
    class Breaks(GraphPass):
        name = "breaks"
        preserves_semantics = True

        def run(self, gm, ctx):
            for node in gm.graph.nodes:
                if node.target is torch.ops.aten.gelu.default:
                    node.target = torch.ops.aten.relu.default
                    node.args = node.args[:1]
                    node.kwargs = {}
            return PassResult(gm, True, "swapped gelu for relu")

    gm, ctx, _ = _traced()
    with pytest.raises(NumericsMismatch, match="pass 'breaks' declares it preserves semantics"):
        PassManager([Breaks()]).run(gm, ctx)


def test_pass_manager_hands_freed_memory_back_after_every_pass(monkeypatch):
    """After each pass the manager releases what the pass freed (``memory.release_freed_memory``), with the
    objects older than the run frozen so each collection scans only what the passes made."""
    import gc

    from ditq_compiler import memory

    class Noop(GraphPass):
        name = "noop"

        def run(self, gm, ctx):
            return PassResult(gm, False, "nothing")

    seen = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: seen.append(gc.get_freeze_count() > 0))
    gm, ctx, _ = _traced()
    PassManager([Noop(), Noop(), Noop()]).run(gm, ctx)
    assert seen == [True, True, True]
    assert gc.get_freeze_count() == 0  # thawed again


def test_dump_instrument_writes_every_pass_and_timings(tmp_path):
    from ditq_compiler.pass_manager import DumpInstrument
    from ditq_compiler.pipeline import build_passes

    gm, ctx, _ = _traced()
    PassManager(build_passes(CONFIG), [DumpInstrument(tmp_path)]).run(gm, ctx)
    names = sorted(p.name for p in tmp_path.iterdir())
    passes = [p.name for p in build_passes(CONFIG)]
    assert names == ["000_traced.txt", *(f"{i:03d}_{name}.txt" for i, name in enumerate(passes, start=1)), "timings.txt"]
    assert passes.index("split_groups") < passes.index("choose_params") < passes.index("insert_qdq")
    dump = (tmp_path / f"{passes.index('insert_qdq') + 1:03d}_insert_qdq.txt").read_text()
    assert "rewrote 14 linears" in dump and "ditq.quantize.default" in dump and "def forward" in dump
    timings = (tmp_path / "timings.txt").read_text().splitlines()
    assert timings[0].split()[:2] == ["pass", "seconds"] and timings[-1].startswith("total")
