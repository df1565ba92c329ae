"""What a model family is to the compiler: one adapter that every stage asks, so that no pass, exporter or
runtime module names a family's inputs, modules or timesteps.

A family says

* **loading**: the diffusers classes it takes, how to build one from its config, and (where it has one) how to
  convert an original checkpoint;
* **the signature** (:class:`Signature`): one :class:`InputSpec` per denoiser input, in the order the compiled
  graph takes them (name, dtype, dims with ``batch`` dynamic, role, and the diffusers forward's keyword it maps
  back to), and the output;
* **export clean-ups**: fx rewrites the family's graph needs before ONNX export;
* **layer roles** and the default quantized set;
* **block structure**: which module names form one transformer block (reconstruction cuts the graph there);
* **the timestep domain** (:class:`TimestepDomain`): discrete or continuous, dtype, range;
* **conditioning and sampling**: what a calibration trajectory is conditioned on, what "unconditional" is, and
  the sampling loop that calls the denoiser.

Denoiser inputs travel through the compiler as a tuple in signature order; code that needs one of them asks the
signature for its position by role (``signature.index("timestep")``), never by name.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

# What a denoiser input does; families use a subset.
ROLES = ("latent", "timestep", "text", "mask", "pooled", "class", "ids", "guidance", "size")

DenoiseFn = Callable[..., torch.Tensor]  # denoise(*inputs in signature order) -> output


@dataclass(frozen=True)
class InputSpec:
    """One denoiser input: its name in the fx graph and the ONNX model, the diffusers forward's keyword it is
    passed as (a dotted path for an entry of a dict keyword: ``added_cond_kwargs.resolution``), its dtype (a numpy
    dtype name), its dims (``"batch"`` is the dynamic batch; other strings are named, fixed at compile time) and
    its role (``size``: a micro-condition such as PixArt-α 1024's resolution and aspect ratio)."""

    name: str
    kwarg: str
    dtype: str
    shape: tuple[str | int, ...]
    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown input role {self.role!r}; roles: {', '.join(ROLES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def kwarg_path(self) -> tuple[str, ...]:
        return tuple(self.kwarg.split("."))

    @property
    def exported_name(self) -> str:
        """The placeholder ``torch.export`` gives this keyword (a dict entry's path joined with ``_``)."""
        return "_".join(self.kwarg_path)

    def value_in(self, arguments: dict):
        """This input's value in a forward's bound ``arguments`` (None where it, or its dict, is absent)."""
        value = arguments
        for key in self.kwarg_path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    def to_manifest(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "role": self.role, "kwarg": self.kwarg}


@dataclass(frozen=True)
class Signature:
    """The denoiser's inputs (in graph order) and its output."""

    inputs: tuple[InputSpec, ...]
    output: str = "out"
    output_shape: tuple[str | int, ...] = ("batch",)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    def index(self, role: str) -> int:
        """The position of the input with this role (the first, where several share it)."""
        for position, spec in enumerate(self.inputs):
            if spec.role == role:
                return position
        raise KeyError(f"the signature has no {role} input (inputs: {', '.join(self.names)})")

    def spec(self, role: str) -> InputSpec:
        return self.inputs[self.index(role)]

    @property
    def timestep_name(self) -> str:
        return self.spec("timestep").name

    def feeds(self, values) -> dict[str, np.ndarray]:
        """ONNX Runtime's feed dict for ``values`` in signature order (tensors or arrays), each in its dtype."""
        if len(values) != len(self.inputs):
            raise ValueError(f"{len(values)} denoiser inputs for a signature of {len(self.inputs)}")
        return {spec.name: np.ascontiguousarray(_numpy(value), dtype=spec.dtype)
                for spec, value in zip(self.inputs, values)}

    def kwargs(self, values) -> dict:
        """The diffusers forward's keyword arguments for ``values`` in signature order (dict keywords nested)."""
        return nest({spec.kwarg_path: value for spec, value in zip(self.inputs, values)})

    @property
    def forward_keywords(self) -> tuple[str, ...]:
        """The forward's top-level keywords the inputs are passed in."""
        return tuple(dict.fromkeys(spec.kwarg_path[0] for spec in self.inputs))

    def rows(self, values, rows) -> tuple:
        """The same inputs restricted to some batch rows."""
        return tuple(value[rows] for value in values)

    def to_manifest(self) -> dict:
        return {"inputs": {spec.name: spec.to_manifest() for spec in self.inputs},
                "outputs": {self.output: {"dtype": "float32", "shape": list(self.output_shape)}}}

    @staticmethod
    def from_manifest(inputs: dict, outputs: dict) -> "Signature":
        """The signature an artifact's manifest records (ordered as written)."""
        specs = tuple(InputSpec(name, str(record.get("kwarg", name)), str(record["dtype"]),
                                tuple(record.get("shape", ["batch"])), str(record.get("role", "latent")))
                      for name, record in inputs.items())
        (output, record), = outputs.items()
        return Signature(specs, output, tuple(record.get("shape", ["batch"])))


def nest(by_path: dict[tuple[str, ...], object]) -> dict:
    """``{("a",): 1, ("b", "c"): 2}`` -> ``{"a": 1, "b": {"c": 2}}``."""
    nested: dict = {}
    for path, value in by_path.items():
        level = nested
        for key in path[:-1]:
            level = level.setdefault(key, {})
        level[path[-1]] = value
    return nested


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


@dataclass(frozen=True)
class TimestepDomain:
    """The values a family's ``timestep`` input takes: ``discrete`` integers or ``continuous`` floats in
    ``[low, high]``, as the scheduler hands them to the model."""

    kind: str  # "discrete" | "continuous"
    dtype: str  # "int64" | "float32"
    low: float
    high: float

    def check(self, timestep: torch.Tensor) -> None:
        """Refuse a timestep outside the domain with one line (a ``TimestepError``)."""
        from ..errors import TimestepError

        bad = (timestep < self.low) | (timestep > self.high) | ~torch.isfinite(timestep.to(torch.float64))
        if bool(bad.any()):
            value = timestep[bad][0].item()
            raise TimestepError(f"timestep {value:g} is outside the scheduler's range [{self.low:g}, {self.high:g}]")

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype, "low": self.low, "high": self.high}


class ModelFamily:
    """The adapter base class; one subclass per family (``families/dit.py``, ...)."""

    name: str = ""
    model_classes: tuple[str, ...] = ()
    # role -> module-name globs
    roles: dict[str, tuple[str, ...]] = {}
    # roles quantized unless a layer rule says otherwise
    default_quantized_roles: tuple[str, ...] = ()
    # roles that stay in float by default and are quantized with ``--quantize-embedders``
    optional_quantized_roles: tuple[str, ...] = ()
    # a transformer block's module names; group 1 is the block's own module (``transformer_blocks.3``)
    block_pattern: re.Pattern | None = None

    # -- smoothing sites (passes/recipes.py, passes/smoothing.py) --------------------------------------------------
    # role -> roles smoothed wherever a recipe smooths that role (PixArt: cross-attention inputs with q/k/v)
    smoothing_companions: dict[str, tuple[str, ...]] = {}
    # roles whose inputs, one per block, must share one smoothing vector (they fold into rows all blocks share)
    smoothing_shared_by_blocks: tuple[str, ...] = ()
    # roles whose input is the same at every timestep: one smoothing vector for all timestep groups
    smoothing_timestep_invariant: tuple[str, ...] = ()

    # -- layer roles -------------------------------------------------------------------------------------------
    def role_of(self, module: str) -> str:
        for role, patterns in self.roles.items():
            if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
                return role
        return "other"

    def quantized_by_default(self, module: str, with_optional: bool = False) -> bool:
        role = self.role_of(module)
        return role in self.default_quantized_roles or (with_optional and role in self.optional_quantized_roles)

    @property
    def default_patterns(self) -> tuple[str, ...]:
        return tuple(p for role in self.default_quantized_roles for p in self.roles[role])

    def block_of(self, module: str) -> str | None:
        """The transformer block a module belongs to (``transformer_blocks.3``), or None outside the blocks."""
        found = self.block_pattern.match(module or "") if self.block_pattern is not None else None
        return found.group(1) if found else None

    # positive integers of the model config that sampling reads back from an artifact's manifest
    required_config_ints: tuple[str, ...] = ()

    # -- loading -----------------------------------------------------------------------------------------------
    # the scheduler a checkpoint without ``scheduler/`` samples with
    default_scheduler_config: dict = {}
    # whether :meth:`load_original` converts the family's original (non-diffusers) checkpoints
    loads_original_checkpoints: bool = False

    def build_model(self, config: dict, where) -> torch.nn.Module:
        raise NotImplementedError

    def load_original(self, file, *, num_heads: int | None = None) -> tuple[torch.nn.Module, dict, str]:
        """``(model, config, sha256)`` of an original checkpoint file."""
        raise NotImplementedError(f"{self.name} has no original checkpoint format")

    # -- signature ---------------------------------------------------------------------------------------------
    def signature(self, model_config: dict) -> Signature:
        raise NotImplementedError

    def example_inputs(self, model_config: dict, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def fixed_dims(self, model_config: dict) -> dict[str, int]:
        """The sizes the model config fixes for the signature's named dims (``channels``: ``in_channels``, ...);
        a named dim not listed is left open (the same value in every call)."""
        return {}

    def export_cleanups(self) -> tuple[Callable, ...]:
        """fx rewrites (``fn(gm) -> int`` changed nodes) run on the traced graph before any pass."""
        return ()

    # -- timesteps, conditioning, sampling ------------------------------------------------------------------------
    # A text-to-image family calibrates through the user's diffusers pipeline (``recording.py``): its calls are
    # recorded and replayed, and ``pipeline_call_kwargs`` are what the pipeline is called with besides the
    # prompts, steps, guidance and generator.
    calibrates_through_pipeline: bool = False

    def pipeline_call_kwargs(self, model_config: dict) -> dict:
        return {"output_type": "latent"}

    def timestep_domain(self, scheduler_config: dict) -> TimestepDomain:
        raise NotImplementedError

    def calibration_conditions(self, model_config: dict, samples: int, seed: int) -> list:
        """What each calibration trajectory is conditioned on (one entry per trajectory)."""
        raise NotImplementedError

    def spread_conditions(self, model_config: dict, count: int, offset: int = 0) -> list:
        """``count`` conditions spread over what the model takes (a probe or error trajectory's), from ``offset``."""
        raise NotImplementedError

    def iterate_sampling(self, denoise: DenoiseFn, scheduler_config: dict, model_config: dict, conditions: list, *,
                         steps: int, guidance_scale: float, seed: int) -> Iterator[tuple[int, tuple, torch.Tensor]]:
        """Yield ``(timestep, denoiser inputs, latents)`` after each step; ``denoise(*inputs)`` is called once a
        step on the guided batch, inputs in signature order."""
        raise NotImplementedError
