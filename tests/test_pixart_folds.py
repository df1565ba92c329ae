"""Smoothing folds on PixArt (adaLN-single, cross-attention to the caption), per timestep group.

A tiny diffusers PixArt whose biases and per-block ``scale_shift_table`` are non-zero, calibrated by replaying
recorded transformer calls (``ctx.recorded_calls``) at six timesteps. Each fold rule is checked on its own for
exactness in every branch (1 and 3 groups, scales shared by the groups, shifts per group): the adaLN-single rows
and block tables (qkv, fc1), V (both attentions' outputs, the cross-attention one with its text mask), the caption
projection (cross-attention K/V); then op counts and structure, the declines and their reasons, and every recipe
through ``FoldSmoothing``. The compile and ONNX path is tested where PixArt compiles end to end.
"""

import copy
import dataclasses
import re
from collections import Counter

import pytest
import torch

from conftest import input_keys_by_role
from pixart_fixtures import make_tiny_pixart
from ditq_compiler import CalibrationConfig, CompileConfig
from ditq_compiler.config import RECIPES
from ditq_compiler.context import CompileContext
from ditq_compiler.families import DIT
from ditq_compiler.families.pixart import PIXART
from ditq_compiler.grouped import get_tensor
from ditq_compiler.pass_manager import PassManager
from ditq_compiler.passes import (AnnotateLinearQuantization, CollectActivationStats, FoldSmoothing, GroupTimesteps,
                                  SplitTimestepGroups)
from ditq_compiler.passes.recipes import SMOOTHING_PASSES
from ditq_compiler.passes.smoothing import AdaLNSingleFold, Smoothing, SmoothingPlan
from ditq_compiler.qspec import PROVENANCE_KEY, SMOOTHING_KEY, SPEC_KEY
from ditq_compiler.tracing import trace_model

RECIPE_NAMES = ["smoothquant", "ptq4dit", "htg", "vidit", "dilate"]
TIMESTEPS = [999, 800, 600, 400, 200, 0]
# Folds are exact algebra; in float32 they reorder a few multiplications.
FOLD_TOLERANCE = 1e-5


def modulated_pixart(seed: int = 3):
    model = make_tiny_pixart(seed=seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1 and parameter.abs().sum() == 0:
                parameter.normal_(0, 0.1)
        for block in model.transformer_blocks:  # shift and scale rows well away from 0, as trained tables are
            block.scale_shift_table.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def pixart():
    """(model, traced graph, config) once for the module; every test splits its own deep copy."""
    model = modulated_pixart()
    config = dict(model.config)
    return model, trace_model(model, PIXART, config, PIXART.example_inputs(config)), config


@pytest.fixture(scope="module")
def check_inputs(pixart):
    model, _, config = pixart
    inputs = PIXART.example_inputs(config, batch=3, seed=5)  # timesteps of every group, padded captions
    with torch.no_grad():
        reference = model(**PIXART.signature(config).kwargs(inputs), return_dict=False)[0]
    return inputs, reference


def recorded_calls(config):
    calls = []
    for index, t in enumerate(TIMESTEPS):
        sample, text, _, mask = PIXART.example_inputs(config, batch=2, seed=index)
        calls.append((t, (sample, text, torch.full((2,), t, dtype=torch.int64), mask)))
    return calls


_SPLIT: dict = {}


def _split(pixart, groups=3, quantize_embedders=False, **config_kwargs):
    """The annotated, calibrated graph split into ``groups`` branches, and its context: fresh copies of one split
    per (groups, quantize_embedders), with ``config_kwargs`` (a recipe) set on the copy's configuration."""
    key = (groups, quantize_embedders)
    if key not in _SPLIT:
        _, gm, model_config = pixart
        config = CompileConfig(calibration=CalibrationConfig(steps=6, samples=2), groups=groups, grouping="uniform",
                               quantize_embedders=quantize_embedders)
        ctx = CompileContext(config, model_config, dict(PIXART.default_scheduler_config),
                             PIXART.example_inputs(model_config), family=PIXART)
        ctx.recorded_calls = recorded_calls(model_config)
        module = PassManager([AnnotateLinearQuantization(), CollectActivationStats(),
                              GroupTimesteps(groups, "uniform"), SplitTimestepGroups()]).run(copy.deepcopy(gm), ctx)
        _SPLIT[key] = (module, ctx)
    module, ctx = copy.deepcopy(_SPLIT[key])  # one deepcopy: the branches keep sharing their tensors
    ctx.config = dataclasses.replace(ctx.config, **config_kwargs)
    ctx.family = PIXART
    return module, ctx


def _width(ctx, key):
    stats = ctx.branches[0].stats.get(key)
    return stats.per_timestep[stats.timesteps[0]].channel_min.numel()


def _random_plan(module, ctx, roles, with_shift=True, per_block=False) -> SmoothingPlan:
    """Scales shared by every group (one object) and, for the roles the family shares across blocks, by every
    block (``per_block``: one per block instead); shifts per block and group."""
    generator = torch.Generator().manual_seed(0)
    plan = SmoothingPlan("test", [{} for _ in ctx.branches])
    for role, keys in input_keys_by_role(module.graph_modules()[0]).items():
        if role not in roles:
            continue
        shared_by_blocks = role in PIXART.smoothing_shared_by_blocks and not per_block
        scale = None
        for key in keys:
            if scale is None or not shared_by_blocks:
                scale = torch.exp(torch.randn(_width(ctx, key), generator=generator, dtype=torch.float64) * 0.7)
            for index in range(len(ctx.branches)):
                shift = torch.randn(_width(ctx, key), generator=generator, dtype=torch.float64) * 0.3 \
                    if with_shift else None
                plan.per_branch[index][key] = Smoothing(scale, shift)
    return plan


def _assert_same_function(module, check_inputs):
    inputs, reference = check_inputs
    with torch.no_grad():
        for index, branch in enumerate(module.graph_modules()):  # per group: each branch alone
            error = float((branch(*inputs) - reference).abs().max() / reference.abs().max())
            assert error <= FOLD_TOLERANCE, (index, error)


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("roles, unfoldable, per_block, rule, expected", [
    (("qkv", "fc1"), "skip", False, "adaln_single_rows", "folded 4 smoothing vectors into adaLN-single rows"),
    (("attn_out",), "skip", False, "attention_value", "folded 4 smoothing vectors into V"),
    (("cross_kv",), "skip", False, "producer_rows", "folded 1 smoothing vectors into the producing linear"),
    (("qkv", "fc1"), "mul", True, "modulation_mul",
     "folded 4 smoothing vectors with multiplies on the adaLN-single modulation"),
    (("fc2", "cross_q", "adaln"), "mul", False, "explicit_mul", "folded 5 smoothing vectors with an explicit multiply"),
])
def test_each_fold_keeps_the_function_in_every_group(pixart, check_inputs, groups, roles, unfoldable, per_block, rule,
                                                     expected):
    module, ctx = _split(pixart, groups)
    ctx.smoothing_plan = _random_plan(module, ctx, roles, per_block=per_block)
    result = FoldSmoothing(unfoldable).run(module, ctx)
    assert result.summary.startswith(expected), result.summary
    assert result.modified
    _assert_same_function(module, check_inputs)
    for gm in module.graph_modules():  # every reader records the transform it now reads, under the rule's name
        readers = [n for n in gm.graph.nodes if SPEC_KEY in n.meta and n.meta[SPEC_KEY].role in roles]
        assert readers and all(n.meta[SMOOTHING_KEY].rule == rule for n in readers)


def test_exact_folds_leave_the_graph_as_it_was_and_modulation_multiplies_stay_small(pixart, check_inputs):
    module, ctx = _split(pixart, groups=1)
    gm = module.graph_modules()[0]
    before = _ops(gm)
    ctx.smoothing_plan = _random_plan(module, ctx, ("qkv", "fc1", "attn_out", "cross_kv"))
    result = FoldSmoothing("skip").run(module, ctx)
    assert result.summary == ("folded 4 smoothing vectors into adaLN-single rows and block tables, 4 into V, "
                              "1 into the producing linear")
    assert _ops(gm) == before  # the same ops in the same order: only tensors changed

    # per-block scales on a fresh copy: one multiply for (1 + scale), a subtract and a multiply for the shift,
    # each on the [B, 1, D] modulation vectors, never on the [B, N, D] activations
    module, ctx = _split(pixart, groups=1)
    gm = module.graph_modules()[0]
    ctx.smoothing_plan = _random_plan(module, ctx, ("qkv", "fc1"), per_block=True)
    FoldSmoothing("mul").run(module, ctx)
    added = Counter(_ops(gm)) - Counter(before)
    sites = 2 * len(pixart[0].transformer_blocks)  # qkv and fc1 per block
    assert added == Counter({"aten.mul.Tensor": 2 * sites, "aten.sub.Tensor": sites})
    created = [n for n in gm.graph.nodes if n.meta.get(PROVENANCE_KEY, {}).get("rule") == "modulation_mul"
               and n.op == "call_function"]
    assert len(created) == 3 * sites and all(tuple(n.meta["val"].shape[1:]) == (1, 24) for n in created)
    _assert_same_function(module, check_inputs)


def test_one_scale_folds_the_shared_rows_once_and_shifts_make_per_group_tables(pixart):
    module, ctx = _split(pixart, groups=3)
    plan = ctx.smoothing_plan = _random_plan(module, ctx, ("qkv", "fc1", "cross_kv"))
    gm = module.graph_modules()[0]
    original = {name: get_tensor(gm, name).detach().to(torch.float64).clone()
                for name in ("adaln_single.linear.weight", "adaln_single.linear.bias")}
    FoldSmoothing("skip").run(module, ctx)
    sharing = module.tensor_sharing()
    assert sharing["adaln_single.linear.weight"] and sharing["adaln_single.linear.bias"]  # s shared, no z in them
    assert not sharing["transformer_blocks.0.scale_shift_table"]  # (T_shift - z_g) / s
    assert sharing["caption_projection.linear_2.weight"] and not sharing["caption_projection.linear_2.bias"]
    # the shared rows took 1/s once, not once per block: shift_msa, scale_msa (qkv) and shift_mlp, scale_mlp (fc1)
    # rows are divided by their role's s, the gates' rows are untouched
    keys = input_keys_by_role(gm)
    weight = get_tensor(gm, "adaln_single.linear.weight").detach().to(torch.float64)
    bias = get_tensor(gm, "adaln_single.linear.bias").detach().to(torch.float64)
    width = _width(ctx, keys["qkv"][0])
    for chunk, role in ((0, "qkv"), (1, "qkv"), (2, None), (3, "fc1"), (4, "fc1"), (5, None)):
        rows = slice(chunk * width, (chunk + 1) * width)
        s = plan.per_branch[0][keys[role][0]].scale if role else torch.ones(width, dtype=torch.float64)
        assert torch.allclose(weight[rows], original["adaln_single.linear.weight"][rows] / s[:, None], rtol=1e-6)
        assert torch.allclose(bias[rows], original["adaln_single.linear.bias"][rows] / s, rtol=1e-6)


def test_per_block_scales_and_unsmoothed_siblings_are_declined_with_their_reasons(pixart):
    module, ctx = _split(pixart, groups=1)
    gm = module.graph_modules()[0]
    weight = get_tensor(gm, "adaln_single.linear.weight")
    ctx.smoothing_plan = _random_plan(module, ctx, ("qkv",), per_block=True)
    result = FoldSmoothing("skip").run(module, ctx)
    assert result.summary == f"skipped 2 qkv inputs: {AdaLNSingleFold.PER_BLOCK}"
    assert sum(f"adaln_single_rows declined: {AdaLNSingleFold.PER_BLOCK}" in line for line in result.details) == 2
    assert not result.modified and get_tensor(gm, "adaln_single.linear.weight") is weight

    # only block 0's qkv input in the plan: block 1 reads the same rows unsmoothed
    ctx.smoothing_plan = _random_plan(module, ctx, ("qkv",))
    first = input_keys_by_role(gm)["qkv"][0]
    ctx.smoothing_plan.per_branch[0] = {first: ctx.smoothing_plan.per_branch[0][first]}
    result = FoldSmoothing("skip").run(module, ctx)
    assert result.summary == "skipped 1 qkv inputs: transformer_blocks.1 reads the same adaLN-single rows unsmoothed"
    assert not result.modified and get_tensor(gm, "adaln_single.linear.weight") is weight


def test_unfoldable_inputs_are_reported_with_their_true_reason(pixart):
    module, ctx = _split(pixart, groups=1, quantize_embedders=True)
    ctx.smoothing_plan = _random_plan(module, ctx, ("fc2", "cross_q", "adaln", "embedder"))
    result = FoldSmoothing("skip").run(module, ctx)
    reasons = {line.split(":in: not smoothed, ")[0]: line.split(":in: not smoothed, ")[1] for line in result.details}
    assert reasons["transformer_blocks.0.ff.net.2"] == "follows GELU"
    assert reasons["transformer_blocks.1.attn2.to_q"].startswith("reads the residual stream")
    assert reasons["adaln_single.linear"] == "follows SiLU"
    assert reasons["caption_projection.linear_2"] == "follows GELU"
    assert reasons["caption_projection.linear_1"].startswith("reads the model input encoder_hidden_states")
    assert not result.modified


def test_recipes_add_the_familys_roles_and_leave_dits_as_they_are():
    for name, spec in RECIPES.items():
        assert spec.roles_for(DIT) == spec.smoothed_roles
    assert RECIPES["ptq4dit"].roles_for(PIXART) == ("qkv", "cross_kv", "cross_q", "attn_out", "fc1")
    assert RECIPES["minmax"].roles_for(PIXART) == ()


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_every_recipe_folds_on_pixart_and_keeps_the_function(pixart, check_inputs, recipe, groups):
    module, ctx = _split(pixart, groups, recipe=recipe)
    smoothing = SMOOTHING_PASSES[recipe](ctx.config).run(module, ctx)
    plans = ctx.smoothing_plan.per_branch
    keys = input_keys_by_role(module.graph_modules()[0])
    # one scale for every block's qkv (fc1) input: the adaLN-single rows are shared by the blocks
    for role in ("qkv", "fc1"):
        assert all(plan[key].scale is plan[keys[role][0]].scale for plan in plans for key in keys[role])
    # the projected caption is the same at every timestep: one Smoothing for every group, whatever the recipe
    (caption,) = keys["cross_kv"]
    assert all(plan[caption] is plans[0][caption] for plan in plans)
    assert "pooled over every timestep group" in next(d for d in smoothing.details if d.startswith(caption))
    fold = FoldSmoothing(ctx.config.unfoldable).run(module, ctx)
    applied = Counter(re.search(r" \((\w+)\)", line).group(1) for line in fold.details if ": folded " in line)
    assert applied == Counter({"adaln_single_rows": 4 * groups, "attention_value": 4 * groups,
                               "producer_rows": groups}), fold.details  # qkv and fc1, both attentions, K/V
    assert "2 cross_q inputs: reads the residual stream" in fold.summary
    _assert_same_function(module, check_inputs)
