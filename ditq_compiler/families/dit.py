"""Class-conditional DiT (adaLN-zero): diffusers' ``DiTTransformer2DModel``.

Signature ``(sample [B, C, H, W] float32, timestep [B] int64, class_labels [B] int64) -> out [B, C_out, H, W]``;
integer timesteps ``0..T-1`` of a DDPM-style scheduler; conditioned on a class label, unconditional on the null
class ``num_embeds_ada_norm``. Sampling follows diffusers' ``DiTPipeline``: classifier-free guidance runs the
conditional and null-class halves in one batch and guides the epsilon channels only; with learned sigma (out
channels = 2 x in) the variance channels are dropped before the scheduler step unless the scheduler learns its
variance.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from ..errors import CheckpointError, ConfigError
from .base import DenoiseFn, InputSpec, ModelFamily, Signature, TimestepDomain


# DiT's own default (the paper's training setup): DDPM, 1000 steps, linear betas.
DIT_DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


class DiTFamily(ModelFamily):
    name = "DiT (adaLN-zero)"
    model_classes = ("DiTTransformer2DModel",)
    roles = {
        "qkv": ("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k",
                "transformer_blocks.*.attn1.to_v"),
        "attn_out": ("transformer_blocks.*.attn1.to_out.0",),
        "fc1": ("transformer_blocks.*.ff.net.0.proj",),
        "fc2": ("transformer_blocks.*.ff.net.2",),
        "adaln": ("transformer_blocks.*.norm1.linear",),
        "embedder": ("transformer_blocks.*.norm1.emb.*", "pos_embed.*"),
        "final": ("proj_out_1", "proj_out_2"),
    }
    default_quantized_roles = ("qkv", "attn_out", "fc1", "fc2", "adaln")
    optional_quantized_roles = ("embedder", "final")
    required_config_ints = ("in_channels", "sample_size", "num_embeds_ada_norm")
    block_pattern = re.compile(r"^(transformer_blocks\.\d+)(?:\.|$)")

    # -- loading -----------------------------------------------------------------------------------------------
    default_scheduler_config = DIT_DEFAULT_SCHEDULER_CONFIG
    loads_original_checkpoints = True

    def load_original(self, file, *, num_heads: int | None = None) -> tuple[torch.nn.Module, dict, str]:
        """A facebookresearch DiT state dict or training checkpoint (``dit_original.py``)."""
        from .dit_original import load_original_dit

        return load_original_dit(file, num_heads=num_heads)

    def build_model(self, config: dict, where) -> torch.nn.Module:
        from diffusers import DiTTransformer2DModel

        try:
            return DiTTransformer2DModel.from_config(config)
        except Exception as exc:
            raise CheckpointError(f"{where}: invalid DiTTransformer2DModel config: {exc}") from None

    # -- signature ---------------------------------------------------------------------------------------------
    def signature(self, model_config: dict) -> Signature:
        return Signature(
            (InputSpec("sample", "hidden_states", "float32", ("batch", "channels", "height", "width"), "latent"),
             InputSpec("timestep", "timestep", "int64", ("batch",), "timestep"),
             InputSpec("class_labels", "class_labels", "int64", ("batch",), "class")),
            output="out", output_shape=("batch", "out_channels", "height", "width"))

    def example_inputs(self, model_config: dict, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        channels, size = int(model_config["in_channels"]), int(model_config["sample_size"])
        num_classes = self.num_classes(model_config)
        sample = torch.randn((batch, channels, size, size), generator=generator)
        timestep = torch.randint(0, 1000, (batch,), generator=generator, dtype=torch.int64)
        labels = torch.randint(0, num_classes + 1, (batch,), generator=generator, dtype=torch.int64)
        return sample, timestep, labels

    @staticmethod
    def num_classes(model_config: dict) -> int:
        return int(model_config["num_embeds_ada_norm"])

    # -- timesteps, conditioning, sampling ------------------------------------------------------------------------
    def timestep_domain(self, scheduler_config: dict) -> TimestepDomain:
        last = int(scheduler_config.get("num_train_timesteps", 1000)) - 1
        return TimestepDomain("discrete", "int64", 0, last)

    def check_class_labels(self, model_config: dict, labels) -> None:
        num_classes = self.num_classes(model_config)
        for label in labels:
            if not 0 <= int(label) < num_classes:
                raise ConfigError(f"class label {label} is outside [0, {num_classes - 1}]")

    def calibration_conditions(self, model_config: dict, samples: int, seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed + 1)
        return torch.randint(0, self.num_classes(model_config), (samples,), generator=generator).tolist()

    def spread_conditions(self, model_config: dict, count: int, offset: int = 0) -> list[int]:
        num_classes = self.num_classes(model_config)
        return [(offset + i) % num_classes for i in range(count)]

    def iterate_sampling(self, denoise: DenoiseFn, scheduler_config: dict, model_config: dict, conditions: list, *,
                         steps: int, guidance_scale: float, seed: int) -> Iterator[tuple[int, tuple, torch.Tensor]]:
        from ..sampling import make_scheduler

        if steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {steps}")
        class_labels = [int(label) for label in conditions]
        self.check_class_labels(model_config, class_labels)
        num_classes = self.num_classes(model_config)
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
            inputs = (model_in, timestep, labels)
            out = denoise(*inputs).to(torch.float32)
            if use_cfg:
                eps, rest = out[:, :channels], out[:, channels:]
                cond, uncond = eps.chunk(2)
                guided = uncond + guidance_scale * (cond - uncond)
                out = torch.cat([guided, rest[:batch]], dim=1)
            if learned_sigma and not learns_variance:
                out = out[:, :channels]
            latents = scheduler.step(out, t, latents, generator=generator).prev_sample
            yield int(t), inputs, latents


DIT = DiTFamily()
