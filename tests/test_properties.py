"""Property-based tests (hypothesis) of the quantizer arithmetic and of manifest parsing.

Layout, so that new properties slot in: shared *strategies* first (scales, zero points, integer specs,
weights, JSON), then one section per subject. Planned sections (the graph-pass side adds them):
int32 bias quantization (``quantize_bias_int32`` / ``bias_fitting_weight_scale``: no overflow, error
within half a bias step) and int4 packing (pack/unpack round trip, nibble order).

Examples are derandomized and no example database is written; hypothesis's caches go to the temporary
directory, not the working tree. Every run tries the same cases, so the fault table's counts are
reproducible.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra import numpy as hnp

from faultlog import record
from ditq_compiler import quant_ops  # noqa: F401  (registers torch.ops.ditq)
from ditq_compiler.artifact import Artifact, write_manifest
from ditq_compiler.errors import ArtifactError
from ditq_compiler.integrity import manifest_text, parse_manifest
from ditq_compiler.qspec import QuantizerSpec, quantize_params_from_range, symmetric_weight_scale

# hypothesis keeps caches (constants, unicode tables) in ./.hypothesis by default: not in the working tree.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "ditq-hypothesis"))
PROPERTY = settings(max_examples=120, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
F32_EPS = float(np.finfo(np.float32).eps)
DTYPE_RANGES = {"uint8": (0, 255, torch.uint8), "int8": (-128, 127, torch.int8)}

# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

scales = st.floats(2.0**-20, 1024.0, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def grids(draw):
    """(dtype, scale, zero point): a per-tensor quantizer as the graph holds it."""
    dtype = draw(st.sampled_from(sorted(DTYPE_RANGES)))
    low, high, _ = DTYPE_RANGES[dtype]
    return dtype, draw(scales), draw(st.integers(low, high))


# The integer specs ditq builds: uint8 affine activations, int8 symmetric weights (full and 7-bit).
integer_specs = st.sampled_from([
    QuantizerSpec.integer("uint8", "tensor", False),
    QuantizerSpec.integer("uint8", "tensor", False, bits=7),
    QuantizerSpec.integer("int8", "tensor", False),
    QuantizerSpec.integer("int8", "channel", True),
    QuantizerSpec.integer("int8", "channel", True, bits=7),
])

finite = st.floats(-(2.0**20), 2.0**20, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def weights_with_dead_rows(draw):
    """[out, in] float32 weights, some rows all zero (a pruned or never-trained output channel)."""
    rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 16))
    values = st.one_of(st.floats(-(2.0**14), 2.0**14, width=32), st.floats(-(2.0**-100), 2.0**-100, width=32))
    weight = draw(hnp.arrays(np.float32, (rows, cols), elements=values))
    dead = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    weight[np.array(dead)] = 0.0
    return torch.from_numpy(weight)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)


def _q(x, scale, zero_point, dtype, axis=0):
    _, _, torch_dtype = DTYPE_RANGES[dtype]
    return torch.ops.ditq.quantize(x, torch.as_tensor(scale, dtype=torch.float32),
                                   torch.as_tensor(zero_point, dtype=torch_dtype), axis)


def _dq(q, scale, zero_point, dtype, axis=0):
    _, _, torch_dtype = DTYPE_RANGES[dtype]
    return torch.ops.ditq.dequantize(q, torch.as_tensor(scale, dtype=torch.float32),
                                     torch.as_tensor(zero_point, dtype=torch_dtype), axis)


def _step_tolerance(scale: float, steps: float) -> float:
    """float32 rounding of x / scale and of (q - z) * scale: a few ulps of the largest value involved."""
    return 4 * F32_EPS * scale * (abs(steps) + 1)


# ---------------------------------------------------------------------------------------------
# quantize / dequantize (quant_ops.py)
# ---------------------------------------------------------------------------------------------

@PROPERTY
@given(grid=grids(), fractions=st.lists(st.floats(0, 1), min_size=1, max_size=16))
def test_round_trip_inside_the_range_is_within_half_a_step(grid, fractions):
    dtype, scale, zero_point = grid
    low, high, _ = DTYPE_RANGES[dtype]
    lo_value, hi_value = (low - zero_point) * scale, (high - zero_point) * scale
    x = torch.tensor([lo_value + f * (hi_value - lo_value) for f in fractions], dtype=torch.float32)
    x = x.clamp(lo_value, hi_value)
    error = (_dq(_q(x, scale, zero_point, dtype), scale, zero_point, dtype) - x).abs()
    bound = scale / 2 + _step_tolerance(scale, high - low)
    assert float(error.max()) <= bound


@PROPERTY
@given(grid=grids(), beyond=st.floats(1.0, 1e6))
def test_values_outside_the_range_saturate(grid, beyond):
    dtype, scale, zero_point = grid
    low, high, _ = DTYPE_RANGES[dtype]
    above = torch.tensor([(high - zero_point + beyond) * scale], dtype=torch.float32)
    below = torch.tensor([(low - zero_point - beyond) * scale], dtype=torch.float32)
    assert int(_q(above, scale, zero_point, dtype)) == high
    assert int(_q(below, scale, zero_point, dtype)) == low


@PROPERTY
@given(rows=st.lists(grids().filter(lambda g: g[0] == "int8"), min_size=1, max_size=6),
       fraction=st.floats(0, 1))
def test_per_channel_quantization_is_per_tensor_quantization_of_each_row(rows, fraction):
    scale = torch.tensor([s for _, s, _ in rows], dtype=torch.float32)
    zero_point = torch.tensor([z for _, _, z in rows], dtype=torch.int8)
    x = torch.tensor([[(-128 - z) * s + fraction * 255 * s] for _, s, z in rows], dtype=torch.float32)
    together = torch.ops.ditq.quantize(x, scale, zero_point, 0)
    for index, (dtype, s, z) in enumerate(rows):
        assert torch.equal(together[index], _q(x[index], s, z, dtype))


# ---------------------------------------------------------------------------------------------
# Parameters from a calibrated range (qspec.quantize_params_from_range)
# ---------------------------------------------------------------------------------------------

@PROPERTY
@given(spec=integer_specs, ends=st.tuples(finite, finite))
def test_params_include_zero_exactly_and_cover_the_range(spec, ends):
    lo, hi = min(ends), max(ends)
    params = quantize_params_from_range(lo, hi, spec)
    scale, zero_point = params.scale, params.zero_point
    assert math.isfinite(scale) and scale > 0
    assert spec.qmin <= zero_point <= spec.qmax
    if spec.symmetric:
        assert zero_point == 0
    dtype = "int8" if spec.qmin < 0 else "uint8"
    zero = torch.zeros(1)
    assert float(_dq(_q(zero, scale, zero_point, dtype), scale, zero_point, dtype)) == 0.0  # exactly
    # The grid [qmin, qmax] (what the spec allows) reaches both ends of [min(lo, 0), max(hi, 0)] to within
    # half a step: the zero point is rounded to an integer, which moves the grid by at most that.
    covered_low, covered_high = (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale
    slack = scale / 2 + _step_tolerance(scale, spec.levels)
    assert covered_low <= min(lo, 0.0) + slack and covered_high >= max(hi, 0.0) - slack


# ---------------------------------------------------------------------------------------------
# Weight scales (qspec.symmetric_weight_scale)
# ---------------------------------------------------------------------------------------------

@PROPERTY
@given(weight=weights_with_dead_rows(), spec=integer_specs.filter(lambda s: s.symmetric))
def test_weight_scales_are_positive_and_keep_dead_rows_representable(weight, spec):
    scale = symmetric_weight_scale(weight, spec)
    assert scale.shape == (weight.shape[0],) and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    zero_point = torch.zeros(weight.shape[0], dtype=torch.int8)
    q = torch.ops.ditq.quantize(weight, scale, zero_point, 0)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax  # absmax maps inside the grid
    back = torch.ops.ditq.dequantize(q, scale, zero_point, 0)
    dead = (weight == 0).all(dim=1)
    assert torch.equal(back[dead], torch.zeros_like(back[dead]))  # a dead row comes back exactly zero
    bound = scale[:, None] / 2 + 4 * F32_EPS * scale[:, None] * (spec.qmax + 1)
    assert bool(((back - weight).abs() <= bound).all())


# ---------------------------------------------------------------------------------------------
# int32 bias (qspec.bias_fitting_weight_scale, qspec.quantize_bias_int32)
# ---------------------------------------------------------------------------------------------

finite_bias = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@PROPERTY
@given(bias=hnp.arrays(np.float32, st.integers(1, 16), elements=finite_bias),
       input_scale=st.floats(min_value=1e-8, max_value=10.0),
       weight_scale=hnp.arrays(np.float32, 16, elements=st.floats(min_value=float(np.float32(1e-12)), max_value=1.0, width=32)))
def test_int32_bias_never_overflows_and_stays_within_half_a_step(bias, input_scale, weight_scale):
    """Whatever the bias and scales (a dead row has s_w = 1e-12), the fitted weight scale makes
    round(b / (s_x s_w)) fit int32, never shrinks a scale, and the bias is exact to half a step."""
    from ditq_compiler.qspec import INT32_MAX, bias_fitting_weight_scale, quantize_bias_int32

    bias_t = torch.from_numpy(bias)
    scale_t = torch.from_numpy(weight_scale[: len(bias)].copy())
    fitted = bias_fitting_weight_scale(bias_t, input_scale, scale_t)
    assert bool((fitted >= scale_t).all())
    q = quantize_bias_int32(bias_t, input_scale, fitted)
    assert q.dtype == torch.int32 and int(q.abs().max()) <= INT32_MAX
    step = input_scale * fitted.to(torch.float64)
    error = (q.to(torch.float64) * step - bias_t.to(torch.float64)).abs()
    assert bool((error <= step / 2 * (1 + 1e-6)).all())
    # the sign is kept: a positive bias never wraps to INT32_MIN
    assert bool(((q >= 0) | (bias_t < 0)).all())


def test_a_dead_adaln_row_with_a_bias_keeps_its_bias():
    """The regression: a dead row (s_w clamped to 1e-12) with bias 0.5 used to become -2^31."""
    from ditq_compiler.qspec import bias_fitting_weight_scale, quantize_bias_int32

    bias, weight_scale = torch.tensor([0.5, -0.25]), torch.tensor([1e-12, 1e-3])
    fitted = bias_fitting_weight_scale(bias, 0.02, weight_scale)
    q = quantize_bias_int32(bias, 0.02, fitted)
    assert float(q[0]) * 0.02 * float(fitted[0]) == pytest.approx(0.5, rel=1e-6)
    assert float(fitted[1]) == pytest.approx(1e-3)  # a healthy row keeps its scale


# ---------------------------------------------------------------------------------------------
# int4 packing (lowering/cpu.py: INT4 initializers; lowering/cuda.py pack_nbits: MatMulNBits' layout)
# ---------------------------------------------------------------------------------------------

@st.composite
def int4_matrices(draw):
    """[K, N] int4 values held in int8: any sizes (odd ones included), negative values and both extremes."""
    k, n = draw(st.integers(1, 37)), draw(st.integers(1, 9))
    return draw(hnp.arrays(np.int8, (k, n), elements=st.integers(-8, 7)))


@PROPERTY
@given(weight=int4_matrices())
def test_int4_initializer_round_trip(weight):
    """What PackInt4Weights stores (two values a byte, ceil(K N / 2) bytes) reads back as the same int8 values."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from ditq_compiler.exporters.lowering import LayerRecord
    from ditq_compiler.exporters.lowering.cpu import PackInt4Weights

    k, n = weight.shape
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=1),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weight, "w"),
                               numpy_helper.from_array(np.ones(n, np.float32), "s"),
                               numpy_helper.from_array(np.zeros(n, np.int8), "z")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert PackInt4Weights({"l": LayerRecord("w", "int4", "float", "qkv")})(model).modified
    stored = {t.name: t for t in ir.to_proto(model).graph.initializer}["w.int4"]
    assert stored.data_type == TensorProto.INT4 and len(stored.raw_data) == (k * n + 1) // 2
    np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.int8), weight)


@PROPERTY
@given(weight=int4_matrices(), block=st.sampled_from([16, 32, 64, 128]))
def test_matmul_nbits_packing_round_trip(weight, block):
    """MatMulNBits' B [N, ceil(K / block), block / 2]: low nibble first, offset 8; a block that does not divide K
    is padded with 8 (zero after the offset), so unpacking gives back W [K, N] and zeros beyond K."""
    from ditq_compiler.exporters.lowering.cuda import pack_nbits

    k, n = weight.shape
    packed = pack_nbits(weight, 4, block)
    blocks = -(-k // block)
    assert packed.dtype == np.uint8 and packed.shape == (n, blocks, block // 2)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks * block).astype(np.int16) - 8
    np.testing.assert_array_equal(codes[:, :k].T, weight)
    assert not codes[:, k:].any()


# ---------------------------------------------------------------------------------------------
# Manifest parsing (integrity.parse_manifest, Artifact.load)
# ---------------------------------------------------------------------------------------------

def _one_clear_error(data, where: str = "art/manifest.json") -> ArtifactError:
    with pytest.raises(ArtifactError) as error:
        parse_manifest(data, where)
    message = str(error.value)
    assert "\n" not in message and where in message
    return error.value


@PROPERTY
@given(value=json_values)
def test_arbitrary_json_is_one_clear_artifact_error(value):
    _one_clear_error(json.dumps(value))
    record("malformed manifest (hypothesis)", "arbitrary JSON", clear_error=True, artifact_lost=None)


@PROPERTY
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_are_one_clear_artifact_error(data):
    _one_clear_error(data)
    record("malformed manifest (hypothesis)", "arbitrary bytes", clear_error=True, artifact_lost=None)


@pytest.fixture(scope="module")
def sound_artifact():
    """A directory with a small model file and a valid, sealed manifest (no compile needed)."""
    directory = Path(tempfile.mkdtemp(prefix="ditq-properties-"))
    (directory / "model.onnx").write_bytes(b"not really onnx, but hashed like one")
    manifest = {"ditq_version": "0.1.0", "quantized_layers": ["a"], "fusion": {"fused_layers": 1, "kernels": {}},
                "files": ["model.onnx"], "scheduler": {"num_train_timesteps": 1000, "_class_name": "DDPMScheduler"},
                "model": {"class": "DiTTransformer2DModel",
                          "config": {"in_channels": 4, "out_channels": 8, "sample_size": 8, "num_embeds_ada_norm": 10}}}
    written = write_manifest(directory, manifest)
    yield directory, written
    import shutil

    shutil.rmtree(directory)


def _paths(value, prefix=()):
    """Every (key path) inside a JSON value, the root excluded."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _mutate(manifest: dict, path: tuple, replacement, delete: bool) -> dict:
    copy = json.loads(json.dumps(manifest))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return copy


@PROPERTY
@given(data=st.data(), replacement=json_values, delete=st.booleans(), reseal=st.booleans())
def test_any_edit_of_a_manifest_is_caught_or_harmless(sound_artifact, data, replacement, delete, reseal):
    """Without the seal recomputed, every edit is caught. With it (someone rewrote the manifest), the
    schema either refuses it with one line or everything ditq reads from it still works."""
    directory, manifest = sound_artifact
    path = data.draw(st.sampled_from(sorted(_paths(manifest), key=repr)))
    edited = _mutate(manifest, path, replacement, delete)
    text = manifest_text(edited) if reseal else json.dumps(edited)
    try:
        parsed = parse_manifest(text, "art/manifest.json")
    except ArtifactError as error:
        assert "\n" not in str(error)
        record("malformed manifest (hypothesis)", "edited manifest", clear_error=True, artifact_lost=None)
        return
    assert reseal or edited == manifest, f"an edit at {path} went unnoticed"
    artifact = Artifact(directory, parsed)
    assert artifact.num_train_timesteps > 0 and artifact.model_config["in_channels"] > 0
    try:
        artifact.verify()
    except ArtifactError as error:
        assert "\n" not in str(error)


def test_a_sound_manifest_loads(sound_artifact):
    directory, manifest = sound_artifact
    assert Artifact.load(directory).manifest == manifest
