"""The DiT sampling loop, shared by calibration (torch model) and the runtime (ONNX Runtime).

It follows diffusers' ``DiTPipeline``: classifier-free guidance runs the conditional and the null-class
halves in one batch and guides the epsilon channels only; with learned sigma (out channels = 2 x in)
the variance channels are dropped before the scheduler step unless the scheduler learns its variance.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .errors import ConfigError, TimestepError

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(config: dict):
    import diffusers
    from diffusers import SchedulerMixin

    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"unknown scheduler class {name!r} in the scheduler config")
    try:
        return cls.from_config(config)
    except Exception as exc:
        raise ConfigError(f"invalid {name} config: {exc}") from None


def check_timesteps(timestep: torch.Tensor, num_train_timesteps: int) -> None:
    bad = (timestep < 0) | (timestep >= num_train_timesteps)
    if bool(bad.any()):
        value = int(timestep[bad][0])
        raise TimestepError(f"timestep {value} is outside the scheduler's range [0, {num_train_timesteps - 1}]")


def iterate_sampling(
    denoise: DenoiseFn,
    scheduler_config: dict,
    model_config: dict,
    class_labels: list[int],
    *,
    steps: int,
    guidance_scale: float,
    seed: int,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(timestep, model_input_batch, latents)`` after each step; the last latents are the samples.

    ``denoise(sample, timestep, class_labels)`` is called once per step on the guided batch.
    """
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    num_classes = int(model_config["num_embeds_ada_norm"])
    for label in class_labels:
        if not 0 <= label < num_classes:
            raise ConfigError(f"class label {label} is outside [0, {num_classes - 1}]")
    scheduler = make_scheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    channels, size = int(model_config["in_channels"]), int(model_config["sample_size"])
    learned_sigma = int(model_config.get("out_channels") or channels) == 2 * channels
    learns_variance = str(getattr(scheduler.config, "variance_type", "")).startswith("learned")
    use_cfg = guidance_scale > 1.0

    generator = torch.Generator().manual_seed(seed)
    batch = len(class_labels)
    latents = torch.randn((batch, channels, size, size), generator=generator) * scheduler.init_noise_sigma
    labels = torch.tensor(class_labels, dtype=torch.int64)
    if use_cfg:
        labels = torch.cat([labels, torch.full_like(labels, num_classes)])  # the null class is index num_classes

    for t in scheduler.timesteps:
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        timestep = torch.full((model_in.shape[0],), int(t), dtype=torch.int64)
        out = denoise(model_in, timestep, labels).to(torch.float32)
        if use_cfg:
            eps, rest = out[:, :channels], out[:, channels:]
            cond, uncond = eps.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
            out = torch.cat([guided, rest[:batch]], dim=1)
        if learned_sigma and not learns_variance:
            out = out[:, :channels]
        latents = scheduler.step(out, t, latents, generator=generator).prev_sample
        yield int(t), model_in, latents


def sample(denoise: DenoiseFn, scheduler_config: dict, model_config: dict, class_labels: list[int], *,
           steps: int, guidance_scale: float, seed: int, progress: bool = False) -> torch.Tensor:
    """Run the whole loop and return the final latents ``[len(class_labels), C, H, W]``."""
    loop = iterate_sampling(denoise, scheduler_config, model_config, class_labels,
                            steps=steps, guidance_scale=guidance_scale, seed=seed)
    if progress:
        from .progress import track

        loop = track(loop, total=steps, description="sampling")
    latents = None
    for _, _, latents in loop:
        pass
    return latents
