"""PixArt-α/Σ (adaLN-single, cross-attention to T5 embeddings): diffusers' ``PixArtTransformer2DModel``.

Signature ``(sample [B, C, H, W] float32, encoder_hidden_states [B, L, D_text] float32, timestep [B] int64,
encoder_attention_mask [B, L] int64) -> out [B, C_out, H, W]``: the latents, the text encoder's hidden states
and its attention mask (1 for a token, 0 for padding, as the tokenizer gives it), and integer timesteps
``0..T-1``. The α-1024 variant (``use_additional_conditions``, on by default at sample size 128) also takes
``added_cond_kwargs``: ``resolution [B, 2]`` (height and width in pixels) and ``aspect_ratio [B, 1]`` float32, two
more inputs of role ``size`` whose keywords are the dict's entries (``added_cond_kwargs.resolution``).

Export clean-up: PixArt's forward ends with ``output.squeeze(1)`` on a tensor whose dim 1 is the token count,
a no-op in torch that ``torch.onnx`` writes as a ``Squeeze`` ONNX Runtime rejects (the dim is not 1). Such
squeezes are dropped from the fx graph before any pass (:func:`drop_noop_squeezes`).

Calibration runs through the user's diffusers pipeline (``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``: T5
text encoding, classifier-free guidance against the empty prompt, the unconditional half first): its transformer
calls are recorded and replayed (``recording.py``). The pipeline is called with ``output_type="latent"`` (no VAE
is loaded), ``clean_caption=False`` (its caption cleaning needs bs4/ftfy and changes prompts) and
``use_resolution_binning=False`` (binning exists only for sample sizes 32/64/128 and would resize the latents).
Sampling for deployment is the pipeline's own, with ``OrtTransformer`` as its transformer (``ort_transformer.py``).
"""

from __future__ import annotations

import re

import torch
from torch import fx

from ..errors import CheckpointError, ConfigError
from .base import InputSpec, ModelFamily, Signature, TimestepDomain


def drop_noop_squeezes(gm: fx.GraphModule) -> int:
    """Remove ``aten.squeeze.dim(s)`` nodes whose squeezed dims are not 1 in the traced shapes (a no-op in torch;
    an invalid ``Squeeze`` in ONNX). A squeeze whose dim may be 1 is kept. Returns how many were dropped."""
    dropped = 0
    squeezes = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in squeezes:
            continue
        source = node.args[0]
        value = source.meta.get("val") if isinstance(source, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        sizes = [value.shape[d] for d in dims]
        if all(not isinstance(size, torch.SymInt) and int(size) != 1 for size in sizes):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            dropped += 1
    return dropped


class PixArtFamily(ModelFamily):
    name = "PixArt (adaLN-single)"
    model_classes = ("PixArtTransformer2DModel",)
    roles = {
        "qkv": ("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k",
                "transformer_blocks.*.attn1.to_v"),
        "attn_out": ("transformer_blocks.*.attn1.to_out.0", "transformer_blocks.*.attn2.to_out.0"),
        "cross_q": ("transformer_blocks.*.attn2.to_q",),
        "cross_kv": ("transformer_blocks.*.attn2.to_k", "transformer_blocks.*.attn2.to_v"),
        "fc1": ("transformer_blocks.*.ff.net.0.proj",),
        "fc2": ("transformer_blocks.*.ff.net.2",),
        "adaln": ("adaln_single.linear",),
        "embedder": ("adaln_single.emb.*", "caption_projection.*", "pos_embed.*"),
        "final": ("proj_out",),
    }
    default_quantized_roles = ("qkv", "attn_out", "cross_q", "cross_kv", "fc1", "fc2", "adaln")
    optional_quantized_roles = ("embedder", "final")
    required_config_ints = ("in_channels", "sample_size", "caption_channels")
    block_pattern = re.compile(r"^(transformer_blocks\.\d+)(?:\.|$)")
    # Smoothing (passes/recipes.py, passes/smoothing.py). The recipes name DiT's roles; where one smooths qkv it
    # also smooths the cross-attention K/V input (the projected caption, folded into caption_projection.linear_2)
    # and Q input (the residual stream: no exact fold, declined with that reason).
    smoothing_companions = {"qkv": ("cross_kv", "cross_q")}
    # adaLN-single: every block's shift/scale chunks are rows of the one adaln_single.linear (plus the block's own
    # scale_shift_table), so the qkv inputs of all blocks must share one smoothing scale, and so must fc1's.
    smoothing_shared_by_blocks = ("qkv", "fc1")
    # The projected caption is the same at every timestep: one smoothing from every timestep group's statistics.
    smoothing_timestep_invariant = ("cross_kv",)
    default_scheduler_config = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
                                "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                                "prediction_type": "epsilon"}

    def build_model(self, config: dict, where) -> torch.nn.Module:
        from diffusers import PixArtTransformer2DModel

        try:
            model = PixArtTransformer2DModel.from_config(config)
        except Exception as exc:
            raise CheckpointError(f"{where}: invalid PixArtTransformer2DModel config: {exc}") from None
        return model

    @staticmethod
    def takes_sizes(model_config: dict) -> bool:
        """PixArt-α 1024's resolution and aspect-ratio inputs: diffusers turns them on at sample size 128 unless
        the config says otherwise."""
        flag = model_config.get("use_additional_conditions")
        return int(model_config.get("sample_size", 0)) == 128 if flag is None else bool(flag)

    def signature(self, model_config: dict) -> Signature:
        sizes = (InputSpec("resolution", "added_cond_kwargs.resolution", "float32", ("batch", 2), "size"),
                 InputSpec("aspect_ratio", "added_cond_kwargs.aspect_ratio", "float32", ("batch", 1), "size")) \
            if self.takes_sizes(model_config) else ()
        return Signature(
            (InputSpec("sample", "hidden_states", "float32", ("batch", "channels", "height", "width"), "latent"),
             InputSpec("encoder_hidden_states", "encoder_hidden_states", "float32",
                       ("batch", "text_tokens", "caption_channels"), "text"),
             InputSpec("timestep", "timestep", "int64", ("batch",), "timestep"),
             InputSpec("encoder_attention_mask", "encoder_attention_mask", "int64", ("batch", "text_tokens"),
                       "mask"),
             *sizes),
            output="out", output_shape=("batch", "out_channels", "height", "width"))

    def example_inputs(self, model_config: dict, batch: int = 2, seed: int = 0,
                       text_tokens: int = 8) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        channels, size = int(model_config["in_channels"]), int(model_config["sample_size"])
        sample = torch.randn((batch, channels, size, size), generator=generator)
        text = torch.randn((batch, text_tokens, int(model_config["caption_channels"])), generator=generator)
        timestep = torch.randint(0, 1000, (batch,), generator=generator, dtype=torch.int64)
        lengths = torch.randint(1, text_tokens + 1, (batch,), generator=generator)
        mask = (torch.arange(text_tokens)[None, :] < lengths[:, None]).to(torch.int64)
        if not self.takes_sizes(model_config):
            return sample, text, timestep, mask
        pixels = float(size * 8)  # the pipeline passes the image size in pixels (latents x 8)
        return (sample, text, timestep, mask, torch.full((batch, 2), pixels), torch.ones((batch, 1)))

    def export_cleanups(self):
        return (drop_noop_squeezes,)

    def timestep_domain(self, scheduler_config: dict) -> TimestepDomain:
        last = int(scheduler_config.get("num_train_timesteps", 1000)) - 1
        return TimestepDomain("discrete", "int64", 0, last)

    # -- calibration and sampling: through the user's diffusers pipeline -----------------------------------------
    calibrates_through_pipeline = True

    def fixed_dims(self, model_config: dict) -> dict[str, int]:
        size = int(model_config["sample_size"])
        return {"channels": int(model_config["in_channels"]), "height": size, "width": size,
                "caption_channels": int(model_config["caption_channels"])}

    def pipeline_call_kwargs(self, model_config: dict) -> dict:
        return {"output_type": "latent", "clean_caption": False, "use_resolution_binning": False}

    def _through_pipeline(self, *args, **kwargs):
        raise ConfigError("PixArt samples through its diffusers pipeline (text encoder, guidance with the empty "
                          "prompt): use `ditq run ARTIFACT --prompt ... --pipeline DIR`, or "
                          "`pipe.transformer = OrtTransformer.from_artifact(DIR)` in your own pipeline")

    calibration_conditions = spread_conditions = iterate_sampling = _through_pipeline


PIXART = PixArtFamily()
