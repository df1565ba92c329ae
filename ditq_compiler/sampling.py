"""Schedulers and the sampling driver, shared by calibration (torch model) and the runtime (ONNX Runtime).

The loop itself is the model family's (``ModelFamily.iterate_sampling``: DiT's follows diffusers'
``DiTPipeline``); this module builds the scheduler a config names and runs a family's loop to the end.
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .families.base import DenoiseFn, ModelFamily


NON_FINITE_FLOATS = ("inf", "-inf", "nan")


def make_scheduler(config: dict):
    import diffusers
    from diffusers import SchedulerMixin

    # a manifest writes a scheduler's infinite floats (DPM-Solver's lambda_min_clipped = -inf) as strings
    config = {key: float(value) if value in NON_FINITE_FLOATS else value for key, value in config.items()}
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"unknown scheduler class {name!r} in the scheduler config")
    try:
        return cls.from_config(config)
    except Exception as exc:
        raise ConfigError(f"invalid {name} config: {exc}") from None


def sample(family: ModelFamily, denoise: DenoiseFn, scheduler_config: dict, model_config: dict, conditions: list, *,
           steps: int, guidance_scale: float, seed: int, progress: bool = False) -> torch.Tensor:
    """Run the family's whole loop and return the final latents (one sample per condition)."""
    loop = family.iterate_sampling(denoise, scheduler_config, model_config, conditions,
                                   steps=steps, guidance_scale=guidance_scale, seed=seed)
    if progress:
        from .progress import track

        loop = track(loop, total=steps, description="sampling")
    latents = None
    for _, _, latents in loop:
        pass
    return latents
