"""Timestep grouping (uniform and HTG) and per-group branches in the artifact."""

import copy

import numpy as np
import onnx
import pytest
import torch

from conftest import TINY_CONFIG
from ditq_compiler import CalibrationConfig, CompileConfig
from ditq_compiler.calibration import ActivationStats, TensorStats
from ditq_compiler.context import CompileContext, TimestepGroup
from ditq_compiler.errors import ConfigError, TimestepError
from ditq_compiler.exporters import fusion_report
from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG
from ditq_compiler.numerics import agreement
from ditq_compiler.passes import GroupTimesteps
from ditq_compiler.passes.grouping import htg_cluster, uniform_groups
from conftest import example_inputs


def test_uniform_groups_tile_the_range():
    groups = uniform_groups(4, 1000)
    assert [(g.start, g.end) for g in groups] == [(0, 249), (250, 499), (500, 749), (750, 999)]


def _three_regime_stats() -> ActivationStats:
    """Calibrated every 20 timesteps; channel statistics jump at t=300 and t=700 (plus small noise)."""
    generator = torch.Generator().manual_seed(0)
    stats = ActivationStats()
    for key in ("a", "b"):
        tensor = TensorStats(key, [key])
        for t in range(10, 1000, 20):
            regime = 0 if t < 300 else 1 if t < 700 else 2
            centre = torch.tensor([0.0, 3.0, -2.0])[regime] + 0.01 * torch.randn(8, generator=generator)
            width = torch.tensor([1.0, 4.0, 2.0])[regime]
            tensor.update(torch.stack([centre - width, centre + width])[None], torch.tensor([t]))
        stats.tensors[key] = tensor
    stats.timesteps = list(range(990, 0, -20))
    return stats


def test_htg_finds_three_regimes_at_the_right_boundaries():
    ctx = CompileContext(CompileConfig(), dict(TINY_CONFIG), dict(DEFAULT_SCHEDULER_CONFIG), ())
    ctx.stats = _three_regime_stats()
    result = GroupTimesteps(3, "htg").run(None, ctx)
    # last calibrated timestep of a regime and first of the next: 290 | 310 and 690 | 710
    assert [(g.start, g.end) for g in ctx.timestep_groups] == [(0, 300), (301, 700), (701, 999)]
    assert not result.modified and "htg: 3 timestep groups" in result.summary
    assert len(ctx.grouping_history["merges"]) == len(ctx.grouping_history["timesteps"]) - 1


def test_htg_merges_only_neighbours():
    features = np.array([[0.0], [10.0], [0.1], [10.1]])  # similar values that are not adjacent in time
    clusters, _ = htg_cluster(features, 2)
    assert all(members == list(range(members[0], members[-1] + 1)) for members in clusters)


def test_grouping_config_errors():
    with pytest.raises(ConfigError, match="unknown grouping 'kmeans'"):
        CompileConfig(grouping="kmeans").validate()
    with pytest.raises(ConfigError, match="--groups 8 needs at least as many calibration steps"):
        CompileConfig(groups=8, calibration=CalibrationConfig(steps=4)).validate()


@pytest.fixture(scope="module", params=[2, 4])
def grouped(request, tiny_dit_dir, tmp_path_factory):
    from ditq_compiler.pipeline import compile_with_result

    config = CompileConfig(calibration=CalibrationConfig(steps=8, samples=2), groups=request.param,
                           grouping="uniform" if request.param == 4 else "htg")
    artifact, result = compile_with_result(tiny_dit_dir, tmp_path_factory.mktemp("grouped") / "art", config)
    return artifact, result, request.param


def _ort(artifact, x, t, y):
    return artifact.session("cpu").run(["out"], {"sample": x.numpy(), "timestep": t.numpy(),
                                                 "class_labels": y.numpy()})[0]


def test_every_branch_matches_its_groups_fake_quant_graph(grouped):
    artifact, result, count = grouped
    groups = [TimestepGroup(**g) for g in artifact.manifest["timestep_groups"]]
    assert len(groups) == count and groups[0].start == 0 and groups[-1].end == 999
    assert all(a.end + 1 == b.start for a, b in zip(groups, groups[1:]))
    x, _, y = example_inputs(TINY_CONFIG, batch=3, seed=7)
    for group, branch in zip(groups, result.graph_module.graph_modules()):
        t = torch.tensor([group.start, (group.start + group.end) // 2, group.end])
        with torch.no_grad():
            expected = branch(x, t, y).numpy()
        got = _ort(artifact, x, t, y)
        match = agreement(got, expected)
        assert match.ok, (group, match.describe())


def test_branches_differ_where_their_parameters_differ(grouped):
    artifact, result, _ = grouped
    x, _, y = example_inputs(TINY_CONFIG, batch=1, seed=7)
    t = torch.tensor([0])
    first, last = result.graph_module.graph_modules()[0], result.graph_module.graph_modules()[-1]
    with torch.no_grad():
        assert not torch.equal(first(x, t, y), last(x, t, y))  # other activation scales -> other rounding


def test_mixed_group_batch_is_served_row_by_row(grouped):
    artifact, result, _ = grouped
    x, _, y = example_inputs(TINY_CONFIG, batch=6, seed=8)
    t = torch.tensor([999, 0, 500, 10, 990, 260])
    with torch.no_grad():
        expected = result.graph_module(x, t, y).numpy()
    got = _ort(artifact, x, t, y)
    assert agreement(got, expected).ok
    for row in range(6):  # and each row equals that row run alone
        alone = _ort(artifact, x[row:row + 1], t[row:row + 1], y[row:row + 1])
        assert np.abs(alone[0] - got[row]).max() <= 1e-5 * np.abs(expected).max()


def test_onnx_runtime_fuses_every_layer_in_every_branch(grouped):
    artifact, _, count = grouped
    report = fusion_report(artifact.model_path, artifact.manifest["quantized_weights"])
    assert report.all_fused, report.unfused
    assert set(report.readers.values()) == {count}  # one integer kernel per layer per branch


def test_shared_weights_are_stored_once_and_the_model_is_valid(grouped, compiled_tiny):
    artifact, _, count = grouped
    model = onnx.load(artifact.model_path)
    onnx.checker.check_model(model, full_check=True)
    if_nodes = [n for n in model.graph.node if n.op_type == "If"]
    assert len(if_nodes) == count
    int8 = sorted(t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    single = onnx.load(compiled_tiny[0].model_path)
    single_int8 = sorted(t.name for t in single.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert int8 == single_int8  # every int8 weight once, shared by the branches
    # per group only the activation scales/zero points and the adaLN layers' int32 biases differ
    renamed = {t.name.rsplit("__group", 1)[0].rsplit(".", 1)[-1] for t in model.graph.initializer
               if "__group" in t.name}
    assert renamed <= {"input_scale", "input_zero_point", "bias_quantized", "bias_scale"}


def test_out_of_range_timestep_is_nan_in_the_graph_and_an_error_in_the_runtime(grouped):
    artifact, result, _ = grouped
    x, _, y = example_inputs(TINY_CONFIG, batch=3, seed=9)
    out = _ort(artifact, x, torch.tensor([5, 1000, -3]), y)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all() and np.isnan(out[2]).all()
    with pytest.raises(TimestepError, match="timestep 1000 is outside"):
        artifact.denoise(x.numpy(), np.array([5, 1000, 0]), y.numpy(), provider="cpu")
    with pytest.raises(TimestepError):
        result.graph_module(x, torch.tensor([5, 1000, 0]), y)


def test_branches_of_one_code_are_exported_once_with_their_own_tensors(grouped):
    """The grouped export runs ``torch.onnx.export`` once and puts each other branch's tensors into it: the result
    is byte-for-byte what exporting every branch on its own gives. A branch whose code, or a differing tensor's
    shape, is not the first branch's is not reused (it is exported on its own)."""
    from ditq_compiler.exporters import onnx_export
    from ditq_compiler.exporters.branches import stitch_group_branches
    from ditq_compiler.grouped import get_tensor, set_tensor

    _, result, _ = grouped
    module, context = result.graph_module, result.context
    signature, inputs = context.signature, context.export_inputs()
    graphs = module.graph_modules()
    raw = onnx_export._export_raw(graphs[0], signature, inputs)
    assert all(onnx_export._with_branch_tensors(raw, graphs[0], gm) is not None for gm in graphs[1:])
    each_alone = stitch_group_branches([onnx_export._export_graph(gm, signature, inputs) for gm in graphs],
                                       [group.end for group in module.groups], module.tensor_sharing(), signature,
                                       first_timestep=module.groups[0].start)
    assert onnx_export.export_onnx(module, signature, inputs).SerializeToString() == each_alone.SerializeToString()

    other = copy.deepcopy(graphs[1])
    scale = next(n.target for n in other.graph.nodes if n.op == "get_attr" and n.target.endswith("input_scale")
                 and get_tensor(other, n.target) is not get_tensor(graphs[0], n.target))
    set_tensor(other, scale, torch.ones(2))  # another shape: not the same export
    assert onnx_export._with_branch_tensors(raw, graphs[0], other) is None
    other = copy.deepcopy(graphs[1])
    sample = next(n for n in other.graph.nodes if n.op == "placeholder")
    with other.graph.inserting_after(sample):
        other.graph.call_function(torch.ops.aten.neg.default, (sample,))
    other.recompile()  # other code
    assert onnx_export._with_branch_tensors(raw, graphs[0], other) is None
