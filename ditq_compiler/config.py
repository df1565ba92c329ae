"""Compile configuration: typed data, validated once at the boundary.

A configuration is a *format* preset (what the numbers look like: W8A8, ...), a *recipe* (how the
quantization parameters are chosen: minmax, ...), layer rules (which linear layers are quantized) and
calibration settings. The CLI and the Python API both build a :class:`CompileConfig`; passes only read it.

Layer selection precedence (documented in the README): the format's default set is applied first
(every linear of the transformer blocks: q, k, v, out projection, fc1, fc2 and the adaLN modulation; with
``quantize_embedders`` also the timestep/class embedders' linears and the final layer), then the user's rules in the order given; a later rule wins over an earlier one. A rule whose pattern
matches no linear layer of the model is an error, not a silent no-op.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, replace

from .errors import ConfigError
from .quantizer_spec import QuantizerSpec


@dataclass(frozen=True)
class FormatSpec:
    """A number format: how weights and activations are quantized (``--format``). ``precision`` is the
    per-layer precision (``--layer PATTERN=<precision>``) its quantized layers get by default."""

    name: str
    weight: QuantizerSpec | None
    activation: QuantizerSpec | None
    implemented: bool
    description: str
    precision: str = ""


# Activations: static, per tensor, affine uint8. uint8 with a zero point is the form ONNX Runtime's CPU int8
# GEMMs (u8 x s8) consume directly; an int8 activation is converted to it by ORT anyway, and that conversion
# fails for a tensor read by several layers (q, k and v share their input), which then stay in float.
# Weights: symmetric (zero point 0, so TensorRT can consume the artifact too), per output channel.
FORMATS: dict[str, FormatSpec] = {
    "w8a8": FormatSpec("w8a8", QuantizerSpec.integer("int8", "channel", True),
                       QuantizerSpec.integer("uint8", "tensor", False), True,
                       "int8 weights per output channel, static uint8 activations per tensor", "int8"),
    "w4a8": FormatSpec("w4a8", QuantizerSpec.integer("int4", "channel", True),
                       QuantizerSpec.integer("uint8", "tensor", False), True,
                       "int4 weights per output channel (stored in 4 bits), static uint8 activations per tensor",
                       "int4"),
    "fp8": FormatSpec("fp8", QuantizerSpec.float8("channel"), QuantizerSpec.float8("tensor"), True,
                      "FP8 E4M3 weights per output channel and activations per tensor (on the CPU: fp8 storage, "
                      "float MatMul)", "fp8"),
    "fp4": FormatSpec("fp4", QuantizerSpec.fp4("channel"), QuantizerSpec.fp4("tensor"), True,
                      "HQ-DiT W4A4: 4-bit float weights and activations, grid (E2M1/E3M0/INT4) and clipping chosen "
                      "per layer; run exactly on the int8 kernels", "fp4"),
}

# --layer PATTERN=<precision>: each precision is the weight/activation pair of the format of that name.
PRECISIONS: dict[str, str] = {"int8": "w8a8", "int4": "w4a8", "fp8": "fp8", "fp4": "fp4"}


@dataclass(frozen=True)
class RecipeSpec:
    """How quantization parameters are chosen (``--recipe``): the smoothing it computes, on which layer
    roles, its default ``--alpha`` and whether its smoothing scales are shared by every timestep group."""

    name: str
    description: str
    # Named after DiT's block; a model family adds its own roles to these (``roles_for``).
    smoothed_roles: tuple[str, ...] = ()
    default_alpha: float | None = None
    default_scales: str = "shared"

    def roles_for(self, family) -> tuple[str, ...]:
        """The roles this recipe smooths on ``family``: each of ``smoothed_roles`` followed by the family's
        companions of it (``family.smoothing_companions``: PixArt smooths its cross-attention inputs where a
        recipe smooths qkv). A family that declares none (DiT) gets ``smoothed_roles`` as they are."""
        companions = family.smoothing_companions
        roles: list[str] = []
        for role in self.smoothed_roles:
            roles += [r for r in (role, *companions.get(role, ())) if r not in roles]
        return tuple(roles)


RECIPES: dict[str, RecipeSpec] = {r.name: r for r in (
    RecipeSpec("minmax", "activation ranges = min/max over the calibration trajectories; weight scales = "
               "per-channel absmax"),
    RecipeSpec("smoothquant", "SmoothQuant: s_j = max|X_j|^a / max|W_j|^(1-a) on every quantized input, folded "
               "where exact", ("qkv", "attn_out", "fc1", "fc2", "adaln"), 0.5),
    RecipeSpec("ptq4dit", "PTQ4DiT: Spearman-weighted salience balancing on qkv, attn out and fc1, weight "
               "clipping by quantile search", ("qkv", "attn_out", "fc1")),
    RecipeSpec("htg", "HTG: per-group channel shift z_g and scale s = sqrt(EMA max|X - z| / max|W|), folded "
               "into the adaLN rows and V", ("qkv", "attn_out", "fc1")),
    RecipeSpec("vidit", "ViDiT-Q channel balancing: s_j = act_j^a / max|W_j|^(1-a), act an EMA of per-step "
               "maxima kept per timestep group", ("qkv", "attn_out", "fc1", "fc2", "adaln"), 0.5, "per-group"),
    RecipeSpec("dilate", "DilateQuant weight dilation: each input channel gets the largest s >= 1 that widens no "
               "output channel's weight range", ("qkv", "attn_out", "fc1", "fc2", "adaln")),
)}

UNFOLDABLE_MODES: dict[str, str] = {
    "skip": "leave inputs with no exact fold (after GELU or SiLU) unsmoothed",
    "mul": "smooth them with an explicit multiply (and subtract, for a shift) before their quantizer",
}
SCALE_SHARING: dict[str, str] = {
    "shared": "one smoothing scale for every timestep group (int8 weights stay shared)",
    "per-group": "smoothing scales per timestep group (each group stores its own weights)",
}
ROTATIONS: dict[str, str] = {
    "none": "no rotation",
    "hadamard": "rotate each quantized input by a block-diagonal Hadamard matrix (weights absorb it); folded into "
                "V for the attention output, an online MatMul elsewhere",
}
WEIGHT_CLIPS: dict[str, str] = {
    "minmax": "scale from each output channel's max |w|",
    "percentile": "PTQ4DiT: clip at the 0.999/0.9999/0.99999 quantile or the max, lowest error per channel",
    "mse": "clip at 0.5..1.0 of the max, lowest (for FP4: activation-weighted) error per channel",
}
ACTIVATION_MODES: dict[str, str] = {
    "static": "activation scales calibrated per tensor and timestep group, fixed in the artifact",
    "dynamic": "activations quantized by the kernel at run time (cpu target, int8/int4 layers): "
               "DynamicQuantizeMatMul, uint8 over the whole tensor, for per-channel weights; MatMulNBits at "
               "accuracy level 4, int8 per token and weight block, for --weight-block",
}
# --weight-block B: int4 weights with one scale per B inputs of each output channel, run as MatMulNBits. The
# default stays per output channel: measured on the 2-core x86 CPU (AVX2), MatMulNBits at every block size
# and accuracy level was 1.2-3x slower than per-channel int4 behind Cast -> MatMulIntegerToFloat in every run
# (one linear and the whole DiT-S/2; docs/benchmarks.md).
WEIGHT_BLOCKS = (32, 64, 128)


@dataclass(frozen=True)
class TargetSpec:
    """Where an artifact runs (``--target``): the ONNX Runtime provider, and the numeric choices that
    provider's kernels dictate. The graph rewrites for each target are ``exporters/lowering/<target>.py``.

    ``activations``: ``as-format`` keeps the format's activation quantizer (CPU: uint8 affine per tensor,
    what ONNX Runtime's u8 x s8 GEMMs take); ``none`` quantizes no activation (CUDA: ONNX Runtime has no
    integer GEMM for Q/DQ graphs there, so the layers are weight-only ``MatMulNBits`` on float16 inputs);
    ``symmetric`` makes integer activations int8 with zero point 0 (TensorRT's parser requires
    ``y_zero_point == 0``; FP8 quantizers are symmetric already). ``int32_bias``: 2-d layers carry the
    int32 bias of ``QGemm`` (CPU only; TensorRT and MatMulNBits add a float bias)."""

    name: str
    provider: str
    activations: str
    int32_bias: bool
    description: str

    def activation_for(self, spec: QuantizerSpec | None) -> QuantizerSpec | None:
        if spec is None or self.activations == "none":
            return None
        if self.activations == "symmetric" and spec.is_integer:
            return QuantizerSpec.integer("int8", spec.granularity, True)
        return spec


TARGETS: dict[str, TargetSpec] = {t.name: t for t in (
    TargetSpec("cpu", "CPUExecutionProvider", "as-format", True,
               "ONNX Runtime's CPU provider: fused int8 kernels (MatMulIntegerToFloat, QGemm), uint8 activations, "
               "float attention fused into MultiHeadAttention"),
    TargetSpec("cuda", "CUDAExecutionProvider", "none", False,
               "ONNX Runtime's CUDA provider: float16 compute, weight-only MatMulNBits (8 or 4 bit), fused "
               "MultiHeadAttention; activations are not quantized"),
    TargetSpec("tensorrt", "TensorrtExecutionProvider", "symmetric", False,
               "ONNX Runtime's TensorRT provider: explicit symmetric Q/DQ (int8 or FP8), one model file per "
               "timestep group"),
)}

WEIGHT_RANGES: dict[str, str] = {
    "full": "int8 weights in [-127, 127]: exact only on CPUs whose u8 x s8 kernels do not saturate (VNNI/AMX)",
    "reduced": "7-bit weights in [-63, 63]: exact on every x86 CPU (no int16 saturation), one bit less precise",
}

@dataclass(frozen=True)
class LayerRule:
    """``pattern`` is an fnmatch glob over module names (``transformer_blocks.*.ff.*``); ``precision`` one of
    ``int8 int4 fp8 fp4`` or ``fp`` (keep in float). ``LayerRule(pattern, True)`` means the format's own
    precision, ``False`` float."""

    pattern: str
    precision: str | bool

    def __post_init__(self) -> None:
        if self.precision is True:
            object.__setattr__(self, "precision", "default")
        elif self.precision is False:
            object.__setattr__(self, "precision", "fp")

    @property
    def quantize(self) -> bool:
        return self.precision != "fp"

    @classmethod
    def parse(cls, text: str) -> "LayerRule":
        """``PATTERN=int8|int4|fp8|fp4|fp``."""
        pattern, sep, mode = text.rpartition("=")
        choices = "|".join([*PRECISIONS, "fp"])
        if not sep or mode not in (*PRECISIONS, "fp") or not pattern:
            raise ConfigError(f"layer rule {text!r} must look like PATTERN={choices}")
        return cls(pattern, mode)


@dataclass(frozen=True)
class CalibrationConfig:
    steps: int = 25
    samples: int = 8
    guidance_scale: float = 4.0
    seed: int = 0
    # a text-to-image family: the prompts file (``--prompts``; None = the shipped list) and a recording of the
    # transformer's calls to calibrate on instead of running the pipeline (``--calibration-inputs``)
    prompts: str | None = None
    inputs: str | None = None

    def validate(self, num_train_timesteps: int | None = None) -> None:
        """Check every number (type, finiteness, range; see ``limits.py`` for why each bound).
        ``num_train_timesteps``, once the checkpoint's scheduler is known, bounds the steps (DiT's 1000
        until then)."""
        from .limits import (DEFAULT_TRAIN_TIMESTEPS, MAX_CALIB_SAMPLES, check_guidance_scale, check_int,
                             check_seed, check_steps)

        check_steps(self.steps, "--calib-steps", num_train_timesteps or DEFAULT_TRAIN_TIMESTEPS)
        check_int(self.samples, "--calib-samples", 1, MAX_CALIB_SAMPLES,
                  "each sample runs in one batch with its guidance twin")
        check_guidance_scale(self.guidance_scale)
        check_seed(self.seed)
        from pathlib import Path

        for flag, file in (("--prompts", self.prompts), ("--calibration-inputs", self.inputs)):
            if file is not None and not Path(file).is_file():
                raise ConfigError(f"{flag}: {file} not found")


RECONSTRUCTIONS: dict[str, str] = {
    "none": "nearest rounding of the chosen parameters",
    "gptq": "GPTQ: per layer, Hessian X^T X of its calibration inputs, column-wise error-compensating rounding "
            "onto the format's grid (int4, int8, FP4)",
    "brecq": "BRECQ: per DiT block, AdaRound soft rounding plus learned activation step sizes, trained against "
             "the float block's output",
    "bkd": "DilateQuant's block-wise distillation: per block, the rounding, weight step sizes and each timestep "
           "group's own activation scale and zero point (temporal parallel quantizer)",
}
RECONSTRUCT_WEIGHTS: dict[str, str] = {
    "pooled": "one learned weight per layer, trained on every timestep group's rows (stored once)",
    "per-group": "each timestep group learns (and stores) its own copy of every weight",
}
MAX_RECONSTRUCT_ITERS = 1_000_000


GROUPINGS: dict[str, str] = {
    "uniform": "equal ranges of timesteps",
    "htg": "bottom-up clustering of neighbouring timesteps by their channel shift and range (HTG)",
}


@dataclass(frozen=True)
class CompileConfig:
    format: str = "w8a8"
    recipe: str = "minmax"
    layer_rules: tuple[LayerRule, ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # Timestep groups: 1 = one set of parameters for every timestep.
    groups: int = 1
    grouping: str = "uniform"
    # Smoothing recipes: migration strength (None: the recipe's default), what to do with inputs that have
    # no exact fold, and whether smoothing scales are shared by the timestep groups (None: recipe default).
    alpha: float | None = None
    unfoldable: str = "skip"
    smooth_scales: str | None = None
    # int8 weight range: full, or reduced to 7 bits so that u8 x s8 kernels without VNNI cannot saturate.
    weight_range: str = "reduced"
    # Weight clipping search (None: the recipe's or format's default).
    weight_clip: str | None = None
    # Hadamard rotation of the quantized inputs (passes/rotation.py): none | hadamard.
    rotate: str = "none"
    # Integer attention (q, k, v and the softmax output in uint8, cpu target): opt-in, it costs PSNR.
    quantize_attention: bool = False
    # Also quantize the family's optional roles (DiT: the timestep/class embedders' linears and the final layer).
    quantize_embedders: bool = False
    # Mixed precision: move the K most sensitive inputs' layers up a precision, or as many as fit the budget.
    keep_sensitive: int = 0
    budget_mb: float | None = None
    # Check after compiling that ONNX Runtime fused every quantized layer into an int8 kernel.
    verify_fusion: bool = True
    # Where the artifact runs: cpu | cuda | tensorrt (TARGETS).
    target: str = "cpu"
    # Activations: static (calibrated) or dynamic (ACTIVATION_MODES); int4 weight block size (None: per channel).
    act: str = "static"
    weight_block: int | None = None
    # Reconstruction after the parameters are chosen (passes/reconstruct): none | gptq | brecq | bkd, training
    # iterations per block (brecq, bkd), a wall-clock budget in minutes for the whole pass (None: no limit), and
    # whether timestep groups share each learned weight (RECONSTRUCT_WEIGHTS).
    reconstruct: str = "none"
    reconstruct_iters: int = 200
    time_budget_min: float | None = None
    reconstruct_weights: str = "pooled"
    # attention heads of an original DiT .pt whose tensors and training args do not give them (--num-heads);
    # checked by the loader
    num_heads: int | None = None

    def validate(self) -> "CompileConfig":
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if not FORMATS[self.format].implemented:
            done = [name for name, spec in FORMATS.items() if spec.implemented]
            raise ConfigError(f"format {self.format!r} is not implemented yet; available: {', '.join(done)}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        self.calibration.validate()
        if self.groups < 1:
            raise ConfigError(f"--groups must be at least 1, got {self.groups}")
        if self.grouping not in GROUPINGS:
            raise ConfigError(f"unknown grouping {self.grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if self.groups > self.calibration.steps:
            raise ConfigError(f"--groups {self.groups} needs at least as many calibration steps "
                              f"(--calib-steps {self.calibration.steps}): every group must be calibrated")
        if self.alpha is not None:
            if not math.isfinite(self.alpha) or not 0.0 <= self.alpha <= 1.0:
                raise ConfigError(f"--alpha must be a number in [0, 1], got {self.alpha}")
            if self.recipe_spec.default_alpha is None:
                raise ConfigError(f"--alpha applies to the recipes that take a migration strength "
                                  f"({', '.join(n for n, r in RECIPES.items() if r.default_alpha is not None)}), "
                                  f"not to {self.recipe!r}")
        if self.unfoldable not in UNFOLDABLE_MODES:
            raise ConfigError(f"unknown --unfoldable {self.unfoldable!r}; choose one of {', '.join(UNFOLDABLE_MODES)}")
        if self.smooth_scales is not None and self.smooth_scales not in SCALE_SHARING:
            raise ConfigError(f"unknown --smooth-scales {self.smooth_scales!r}; choose one of "
                              f"{', '.join(SCALE_SHARING)}")
        if self.weight_range not in WEIGHT_RANGES:
            raise ConfigError(f"unknown --weight-range {self.weight_range!r}; choose one of {', '.join(WEIGHT_RANGES)}")
        if self.rotate not in ROTATIONS:
            raise ConfigError(f"unknown --rotate {self.rotate!r}; choose one of {', '.join(ROTATIONS)}")
        if not isinstance(self.keep_sensitive, int) or self.keep_sensitive < 0:
            raise ConfigError(f"--keep-sensitive must be a whole number >= 0, got {self.keep_sensitive}")
        if self.budget_mb is not None:
            if not math.isfinite(self.budget_mb) or self.budget_mb <= 0:
                raise ConfigError(f"--budget-mb must be a positive number, got {self.budget_mb}")
            if self.keep_sensitive:
                raise ConfigError("give either --keep-sensitive or --budget-mb, not both")
        if self.weight_clip is not None and self.weight_clip not in WEIGHT_CLIPS:
            raise ConfigError(f"unknown --weight-clip {self.weight_clip!r}; choose one of {', '.join(WEIGHT_CLIPS)}")
        if self.target not in TARGETS:
            raise ConfigError(f"unknown --target {self.target!r}; choose one of {', '.join(TARGETS)}")
        self._validate_reconstruction()
        precisions = {self.format_spec.precision} | {r.precision for r in self.layer_rules}
        self._validate_lowbit_kernels(precisions)
        if self.target == "cuda" and "fp8" in precisions:
            raise ConfigError("--target cuda does not take fp8 layers: ONNX Runtime's CUDA provider has no FP8 GEMM "
                              "for Q/DQ graphs and MatMulNBits takes int4/int8 weights; use --target tensorrt for FP8")
        if self.target == "tensorrt" and "fp4" in precisions:
            raise ConfigError("--target tensorrt does not take fp4 layers: ditq's FP4 runs exactly on int8 kernels "
                              "with uint8 activations (TensorRT's FP4 is NVFP4 on Blackwell); use --target cpu")
        _ = self.attention_spec  # refuses --quantize-attention where no integer kernel can take it
        return self

    def _validate_lowbit_kernels(self, precisions: set[str]) -> None:
        """--weight-block and --act dynamic: only where a kernel runs them (one line each)."""
        if self.act not in ACTIVATION_MODES:
            raise ConfigError(f"unknown --act {self.act!r}; choose one of {', '.join(ACTIVATION_MODES)}")
        if self.weight_block is not None:
            if self.weight_block not in WEIGHT_BLOCKS:
                raise ConfigError(f"--weight-block must be one of {', '.join(map(str, WEIGHT_BLOCKS))}, got "
                                  f"{self.weight_block}")
            if "int4" not in precisions:
                raise ConfigError("--weight-block applies to int4 weights: use --format w4a8 (or --layer PATTERN=int4)")
            if self.target != "cpu":
                raise ConfigError(f"--weight-block runs on --target cpu only (MatMulNBits with block-wise scales); "
                                  f"--target {self.target} takes per-channel int4 weights: drop --weight-block")
            if self.reconstruct != "none":
                raise ConfigError("--reconstruct learns per-channel weight grids, not --weight-block's blocks: drop "
                                  "--weight-block (per-channel int4) to reconstruct")
        if self.act == "dynamic":
            if self.target != "cpu":
                raise ConfigError(f"--act dynamic runs on --target cpu only (ONNX Runtime's DynamicQuantizeMatMul "
                                  f"and MatMulNBits); --target {self.target} takes static activations")
            others = sorted(p for p in precisions if p not in ("int8", "int4", "fp", "default"))
            if others:
                raise ConfigError(f"--act dynamic applies to int8 and int4 layers only (ONNX Runtime has no fused "
                                  f"dynamic kernel for {'/'.join(others)}): use --act static")
            if self.reconstruct != "none":
                raise ConfigError("--act dynamic has no calibrated activation parameters to reconstruct: "
                                  "use --act static with --reconstruct")

    def _validate_reconstruction(self) -> None:
        from .limits import check_int, check_real

        if self.reconstruct not in RECONSTRUCTIONS:
            raise ConfigError(f"unknown --reconstruct {self.reconstruct!r}; choose one of {', '.join(RECONSTRUCTIONS)}")
        check_int(self.reconstruct_iters, "--reconstruct-iters", 0, MAX_RECONSTRUCT_ITERS)
        if self.time_budget_min is not None:
            check_real(self.time_budget_min, "--time-budget", 0.0, 7 * 24 * 60.0, "minutes; a week at most")
        if self.reconstruct_weights not in RECONSTRUCT_WEIGHTS:
            raise ConfigError(f"unknown --reconstruct-weights {self.reconstruct_weights!r}; choose one of "
                              f"{', '.join(RECONSTRUCT_WEIGHTS)}")

    @property
    def format_spec(self) -> FormatSpec:
        return FORMATS[self.format]

    @property
    def recipe_spec(self) -> RecipeSpec:
        return RECIPES[self.recipe]

    @property
    def effective_alpha(self) -> float | None:
        return self.alpha if self.alpha is not None else self.recipe_spec.default_alpha

    @property
    def effective_scale_sharing(self) -> str:
        return self.smooth_scales or self.recipe_spec.default_scales

    @property
    def effective_weight_clip(self) -> str:
        """``--weight-clip``, else PTQ4DiT's percentile search for ptq4dit, an MSE search for FP4 (HQ-DiT's
        clipping selection), min/max otherwise."""
        if self.weight_clip:
            return self.weight_clip
        if self.recipe == "ptq4dit":
            return "percentile"
        return "mse" if self.format == "fp4" else "minmax"

    @property
    def weight_spec(self) -> QuantizerSpec:
        return self.weight_spec_for(self.format_spec.precision)

    @property
    def activation_spec(self) -> QuantizerSpec | None:
        return self.activation_spec_for(self.format_spec.precision)

    def weight_spec_for(self, precision: str) -> QuantizerSpec:
        spec = FORMATS[PRECISIONS[precision]].weight
        if spec.dtype == "int4" and self.weight_block is not None:
            return QuantizerSpec.integer("int4", "block", True, block_size=self.weight_block)
        if spec.dtype == "int8" and self.weight_range == "reduced":
            return QuantizerSpec.integer("int8", spec.granularity, spec.symmetric, bits=7)
        return spec

    @property
    def attention_spec(self) -> QuantizerSpec | None:
        """q, k, v and the softmax output in uint8 affine per tensor: ONNX Runtime's CPU provider runs
        QK^T and PV on its integer kernels (uint8 x uint8, which cannot saturate). Off by default: on the
        reference model it costs PSNR (docs/quality.md), enough to fail the regression guard of
        tests/test_reference_model.py."""
        integer_inputs = self.format_spec.activation.dtype != "float8e4m3fn" and self.act != "dynamic"
        if not self.quantize_attention:
            return None
        if self.target != "cpu":
            raise ConfigError("--quantize-attention runs on the cpu target only (the GPU targets fuse attention "
                              "in float); drop it or use --target cpu")
        if not integer_inputs:
            raise ConfigError("--quantize-attention needs static integer activations (PV's integer kernel writes "
                              "into the output projection's input grid); drop it with --format fp8 or --act dynamic")
        return QuantizerSpec.integer("uint8", "tensor", False)

    def activation_spec_for(self, precision: str) -> QuantizerSpec | None:
        """The format's activation quantizer as the target takes it (see :class:`TargetSpec`); with ``--act
        dynamic``, the run-time quantizer of the kernel the layer becomes."""
        spec = self.target_spec.activation_for(FORMATS[PRECISIONS[precision]].activation)
        if spec is not None and self.act == "dynamic":
            block = self.weight_spec_for(precision).block_size
            return QuantizerSpec.dynamic_activation(block)
        return spec

    @property
    def target_spec(self) -> TargetSpec:
        return TARGETS[self.target]

    def with_rules(self, *rules: LayerRule) -> "CompileConfig":
        return replace(self, layer_rules=self.layer_rules + tuple(rules))

    def select_layers(self, layer_names: list[str], family) -> dict[str, str | None]:
        """The precision of each of ``layer_names`` (None: kept in float), after ``family``'s default set
        (the format's precision; its optional roles too with ``quantize_embedders``) and the rules (later rules
        win)."""
        default = self.format_spec.precision
        decision = {name: default if family.quantized_by_default(name, self.quantize_embedders) else None
                    for name in layer_names}
        for rule in self.layer_rules:
            matched = [name for name in layer_names if fnmatch.fnmatchcase(name, rule.pattern)]
            if not matched:
                sample = ", ".join(layer_names[:4])
                raise ConfigError(
                    f"layer pattern {rule.pattern!r} matches no linear layer of this model "
                    f"(names look like: {sample}, ...)"
                )
            for name in matched:
                decision[name] = None if rule.precision == "fp" else \
                    default if rule.precision == "default" else rule.precision
        return decision

    def to_manifest(self) -> dict:
        return {
            "format": self.format,
            "recipe": self.recipe,
            "recipe_options": {"alpha": self.effective_alpha, "unfoldable": self.unfoldable,
                               "smooth_scales": self.effective_scale_sharing},
            "target": self.target,
            "weight_range": self.weight_range,
            "weight_clip": self.effective_weight_clip,
            "rotate": self.rotate,
            "act": self.act,
            "weight_block": self.weight_block,
            "quantize_attention": self.attention_spec is not None,
            "quantize_embedders": self.quantize_embedders,
            "mixed_precision": {"keep_sensitive": self.keep_sensitive, "budget_mb": self.budget_mb},
            "layer_rules": [{"pattern": r.pattern, "precision": r.precision} for r in self.layer_rules],
            "grouping": {"groups": self.groups, "method": self.grouping},
            "reconstruction": {"method": self.reconstruct, "iterations": self.reconstruct_iters,
                               "time_budget_min": self.time_budget_min, "weights": self.reconstruct_weights},
            "calibration": {
                "steps": self.calibration.steps,
                "samples": self.calibration.samples,
                "guidance_scale": self.calibration.guidance_scale,
                "seed": self.calibration.seed,
            },
        }
