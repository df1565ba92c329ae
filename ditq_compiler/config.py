"""Compile configuration: typed data, validated once at the boundary.

A configuration is a *format* preset (what the numbers look like: W8A8, ...), a *recipe* (how the
quantization parameters are chosen: minmax, ...), layer rules (which linear layers are quantized) and
calibration settings. The CLI and the Python API both build a :class:`CompileConfig`; passes only read it.

Layer selection precedence (documented in the README): the format's default set is applied first
(every linear of the transformer blocks: q, k, v, out projection, fc1, fc2 and the adaLN modulation),
then the user's rules in the order given; a later rule wins over an earlier one. A rule whose pattern
matches no linear layer of the model is an error, not a silent no-op.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from .errors import ConfigError


@dataclass(frozen=True)
class WeightQuantSpec:
    """Weights: symmetric (zero point 0, so TensorRT can consume the artifact too), per output channel."""

    dtype: str = "int8"

    @property
    def qmax(self) -> int:
        return {"int8": 127, "int4": 7}[self.dtype]


@dataclass(frozen=True)
class ActivationQuantSpec:
    """Activations: static, per tensor, asymmetric uint8.

    uint8 with a zero point is the form ONNX Runtime's CPU int8 GEMMs (u8 x s8) consume directly; an
    int8 activation is converted to it by ORT anyway, and that conversion fails for a tensor read by
    several layers (q, k and v share their input), which then stay in float. Measured, see README.
    """

    dtype: str = "uint8"


@dataclass(frozen=True)
class FormatSpec:
    name: str
    weight: WeightQuantSpec | None
    activation: ActivationQuantSpec | None
    implemented: bool
    description: str


FORMATS: dict[str, FormatSpec] = {
    "w8a8": FormatSpec("w8a8", WeightQuantSpec(), ActivationQuantSpec(), True,
                       "int8 weights per output channel, static uint8 activations per tensor"),
    "w4a8": FormatSpec("w4a8", WeightQuantSpec(dtype="int4"), ActivationQuantSpec(), False,
                       "int4 weights, 8-bit activations"),
    "fp8": FormatSpec("fp8", None, None, False, "FP8 (E4M3) weights and activations"),
    "fp4": FormatSpec("fp4", None, None, False, "FP4 (E2M1) weights and activations"),
}

RECIPES: dict[str, str] = {
    "minmax": "activation ranges = min/max over the calibration trajectories; weight scales = per-channel absmax",
}

# Default quantized set: every linear of the blocks and the adaLN modulation linears.
DEFAULT_QUANTIZED_PATTERNS: tuple[str, ...] = (
    "transformer_blocks.*.attn1.to_q",
    "transformer_blocks.*.attn1.to_k",
    "transformer_blocks.*.attn1.to_v",
    "transformer_blocks.*.attn1.to_out.0",
    "transformer_blocks.*.ff.net.0.proj",
    "transformer_blocks.*.ff.net.2",
    "transformer_blocks.*.norm1.linear",
)


@dataclass(frozen=True)
class LayerRule:
    """``pattern`` is an fnmatch glob over module names (``transformer_blocks.*.ff.*``)."""

    pattern: str
    quantize: bool

    @classmethod
    def parse(cls, text: str) -> "LayerRule":
        """``PATTERN=int8`` or ``PATTERN=fp``."""
        pattern, sep, mode = text.rpartition("=")
        if not sep or mode not in ("int8", "fp") or not pattern:
            raise ConfigError(f"layer rule {text!r} must look like PATTERN=int8 or PATTERN=fp")
        return cls(pattern, mode == "int8")


@dataclass(frozen=True)
class CalibrationConfig:
    steps: int = 25
    samples: int = 8
    guidance_scale: float = 4.0
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--calib-steps must be at least 1, got {self.steps}")
        if self.samples < 1:
            raise ConfigError(f"--calib-samples must be at least 1, got {self.samples}")
        if self.guidance_scale < 0:
            raise ConfigError(f"--guidance-scale must be >= 0, got {self.guidance_scale}")


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
    # Check after compiling that ONNX Runtime fused every quantized layer into an int8 kernel.
    verify_fusion: bool = True

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
        return self

    @property
    def format_spec(self) -> FormatSpec:
        return FORMATS[self.format]

    def with_rules(self, *rules: LayerRule) -> "CompileConfig":
        return replace(self, layer_rules=self.layer_rules + tuple(rules))

    def select_layers(self, layer_names: list[str]) -> dict[str, bool]:
        """Which of ``layer_names`` are quantized, after defaults and rules (later rules win)."""
        decision = {name: _matches_any(name, DEFAULT_QUANTIZED_PATTERNS) for name in layer_names}
        for rule in self.layer_rules:
            matched = [name for name in layer_names if fnmatch.fnmatchcase(name, rule.pattern)]
            if not matched:
                sample = ", ".join(layer_names[:4])
                raise ConfigError(
                    f"layer pattern {rule.pattern!r} matches no linear layer of this model "
                    f"(names look like: {sample}, ...)"
                )
            for name in matched:
                decision[name] = rule.quantize
        return decision

    def to_manifest(self) -> dict:
        return {
            "format": self.format,
            "recipe": self.recipe,
            "layer_rules": [{"pattern": r.pattern, "quantize": r.quantize} for r in self.layer_rules],
            "grouping": {"groups": self.groups, "method": self.grouping},
            "calibration": {
                "steps": self.calibration.steps,
                "samples": self.calibration.samples,
                "guidance_scale": self.calibration.guidance_scale,
                "seed": self.calibration.seed,
            },
        }


def _matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
