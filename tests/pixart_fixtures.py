"""Tiny PixArt-α/Σ pipelines built in code, seeded, as diffusers' own pipeline tests build their dummy components:
a tiny T5 encoder from a transformers config (with a few large channels in its final norm, as real T5 has, so its
embeddings are not mistaken for random ones), a word-level tokenizer over the calibration prompts' words, a DPM-Solver
scheduler, a one-level AutoencoderKL (latents at pixel resolution) and a tiny PixArt transformer."""

from __future__ import annotations

import re
from pathlib import Path

import torch

TEXT_WIDTH = 32
OUTLIER_CHANNELS = (3, 17, 29)  # T5-like: a few channels of the encoder's output far larger than the rest


def make_tiny_pixart(seed: int = 0, **overrides):
    """A tiny random PixArt-α transformer."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    config = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                  caption_channels=TEXT_WIDTH, in_channels=4, cross_attention_dim=24, out_channels=8,
                  attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                  use_additional_conditions=False)
    config.update(overrides)
    return PixArtTransformer2DModel(**config).eval()


def make_tiny_text_encoder(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    from ditq_compiler.prompts import CALIBRATION_PROMPTS

    torch.manual_seed(seed)
    words = sorted({w for prompt in CALIBRATION_PROMPTS for w in re.findall(r"\w+|[^\w\s]", prompt.lower())})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    config = T5Config(vocab_size=len(vocab), d_model=TEXT_WIDTH, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    encoder = T5EncoderModel(config).eval()
    with torch.no_grad():
        encoder.encoder.final_layer_norm.weight[list(OUTLIER_CHANNELS)] = torch.tensor([30.0, -20.0, 25.0])
    return encoder, make_tokenizer(vocab)


def make_tokenizer(vocab: dict[str, int]):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def make_tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=8).eval()


def make_tiny_pixart_pipeline(variant: str = "alpha", seed: int = 0, with_encoder: bool = True, with_vae: bool = True,
                              **overrides):
    """A tiny PixArt-α (``variant="alpha"``) or PixArt-Σ (``"sigma"``) pipeline. ``with_vae=False``: no VAE, as a
    pixel-space model ships (give it ``in_channels=1, out_channels=2``)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    pipeline_class = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    transformer = make_tiny_pixart(seed=seed, **({"interpolation_scale": 1} if variant == "sigma" else {}),
                                   **overrides)
    with torch.no_grad():  # scale_shift_table starts near 0: give every block's table signal, as trained ones have
        for block in transformer.transformer_blocks:
            block.scale_shift_table.normal_(0, 0.1)
    encoder, tokenizer = make_tiny_text_encoder(seed) if with_encoder else (None, None)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                                            beta_end=0.02, prediction_type="epsilon")
    return pipeline_class(tokenizer=tokenizer, text_encoder=encoder, vae=make_tiny_vae(seed) if with_vae else None,
                          transformer=transformer, scheduler=scheduler)


def save_tiny_pixart_pipeline(directory: Path, variant: str = "alpha", seed: int = 0, with_encoder: bool = True,
                              with_vae: bool = True, **overrides) -> Path:
    pipe = make_tiny_pixart_pipeline(variant, seed, with_encoder, with_vae, **overrides)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)
