"""Train ditq's reference PixArt: a text-conditioned PixArtTransformer2DModel on scikit-learn's digits.

Set up as PixArt-α is, at toy scale: adaLN-single, cross-attention to the hidden states of a frozen T5 encoder
(masked to the caption's tokens), learned sigma, DDPM with 1000 steps and linear betas, epsilon prediction, the
hybrid loss of improved DDPM, 10% of the captions replaced by the empty prompt (the unconditional half of
PixArt's classifier-free guidance), EMA weights. Training settings are the reference DiT's
(``tools/diffusion_training.py``).

The text encoder is a tiny T5 encoder built from a transformers config with seeded random weights and never
trained: the captions ("a handwritten seven", "the digit 7", ...) only need distinct, fixed embeddings. Real T5
hidden states carry a few channels far larger than the rest; a random encoder's do not, so four channels of its
final RMSNorm weight are set large to give the embeddings the same shape of outliers (bench/bench_quality_pixart.py
reports the channel max/median they give). The tokenizer is word-level over the captions' words.

    python tools/train_reference_pixart.py --out models/pixart-digits --steps 6000 --seed 0

Writes a diffusers ``PixArtAlphaPipeline`` directory (``transformer/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``: DPM-Solver++ as PixArt ships; no VAE, the model works at 16x16 pixels), ``prompts.txt`` (the
calibration prompts: every caption template for every digit), ``training_config.json`` and the loss curve.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusion_training import plot_curve, train, training_parser  # noqa: E402
from digits import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors  # noqa: E402

TEXT_WIDTH = 64
TEXT_OUTLIERS = {5: 40.0, 22: -30.0, 41: 35.0, 58: -45.0}  # channel: final RMSNorm weight (the others stay 1)
MODEL_CONFIG = dict(
    sample_size=IMAGE_SIZE, num_layers=4, patch_size=2, attention_head_dim=32, num_attention_heads=4,
    caption_channels=TEXT_WIDTH, in_channels=1, out_channels=2, cross_attention_dim=128, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("a handwritten {word}", "the digit {n}", "a drawing of the number {word}", "{word}",
                     "a scanned handwritten digit {n}", "a small grey {word} on a black background",
                     "number {word}")


def captions_for(digit: int) -> list[str]:
    return [t.format(word=DIGIT_WORDS[digit], n=digit) for t in CAPTION_TEMPLATES]


def build_text_encoder(seed: int):
    """The frozen tiny T5 encoder and its word-level tokenizer (see the module docstring)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = sorted({w for d in range(NUM_CLASSES) for c in captions_for(d) for w in re.findall(r"\w+", c.lower())})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=TEXT_WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    encoder = T5EncoderModel(config).eval().requires_grad_(False)
    with torch.no_grad():
        for channel, weight in TEXT_OUTLIERS.items():
            encoder.encoder.final_layer_norm.weight[channel] = weight
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    return encoder, tokenizer


@torch.no_grad()
def encode(encoder, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states ``[N, L, D]`` and masks ``[N, L]`` padded to the longest caption. PixArt masks the padding
    keys, so the model's output does not depend on the padded length (the pipeline pads to 120)."""
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden, tokens.attention_mask


def save_pipeline(transformer, encoder, tokenizer, out: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG))
    pipe.save_pretrained(str(out), safe_serialization=True)


def main(argv=None) -> None:
    args = training_parser(__doc__, Path("models/pixart-digits"), "--caption-dropout").parse_args(argv)

    from diffusers import PixArtTransformer2DModel

    torch.set_num_threads(args.threads)
    encoder, tokenizer = build_text_encoder(args.seed)
    per_digit = [captions_for(d) for d in range(NUM_CLASSES)]
    all_captions = [c for captions in per_digit for c in captions] + [""]
    hidden, mask = encode(encoder, tokenizer, all_captions)
    null_index = len(all_captions) - 1
    templates = len(CAPTION_TEMPLATES)
    images, labels = load_digits_tensors()

    def predict_batch(model, generator):
        index = torch.randint(0, images.shape[0], (args.batch_size,), generator=generator)
        x0, y = images[index], labels[index]
        caption = y * templates + torch.randint(0, templates, y.shape, generator=generator)
        drop = torch.rand(y.shape, generator=generator) < args.caption_dropout
        caption[drop] = null_index  # the empty prompt: the unconditional half of classifier-free guidance
        text, text_mask = hidden[caption], mask[caption]
        return x0, lambda xt, t: model(xt, encoder_hidden_states=text, timestep=t,
                                       encoder_attention_mask=text_mask).sample

    torch.manual_seed(args.seed)
    model = PixArtTransformer2DModel(**MODEL_CONFIG)
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = [c for captions in per_digit for c in captions]
    (args.out / "prompts.txt").write_text("# calibration prompts: every caption template for every digit\n"
                                          + "\n".join(prompts) + "\n")
    _, seconds = train(model, predict_batch, args, lambda ema: save_pipeline(ema, encoder, tokenizer, args.out))
    config = {**vars(args), "out": str(args.out), "model": MODEL_CONFIG, "scheduler": SCHEDULER_CONFIG,
              "text_encoder": {"class": "T5EncoderModel", "d_model": TEXT_WIDTH, "layers": 2, "heads": 4,
                               "seed": args.seed, "final_norm_outlier_channels": TEXT_OUTLIERS, "trained": False},
              "captions": list(CAPTION_TEMPLATES),
              "data": "sklearn.datasets.load_digits, 8x8 bilinear-upsampled to 16x16, scaled to [-1, 1]",
              "loss": "L_simple (epsilon MSE) + L_vlb (variance, stopped-gradient mean)",
              "train_seconds": round(seconds, 1), "torch": torch.__version__}
    (args.out / "training_config.json").write_text(json.dumps(config, indent=2) + "\n")
    plot_curve(args.out, "reference PixArt on digits: training loss")


if __name__ == "__main__":
    main()
