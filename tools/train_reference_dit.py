"""Train ditq's reference DiT: a class-conditional DiTTransformer2DModel on scikit-learn's digits.

Set up as DiT-XL/2 is, at toy scale: learned sigma (out channels = 2 x in), adaLN-zero, DDPM with 1000
steps and linear betas, epsilon prediction, 10% class dropout for classifier-free guidance, the hybrid
loss ``L_simple + L_vlb`` (improved DDPM; the variance term sees a stopped-gradient mean), EMA weights.

    python tools/train_reference_dit.py --out models/dit-digits --steps 8000 --seed 0

Writes ``transformer/`` and ``scheduler/`` (diffusers layout), ``training_config.json`` and the loss
curve (``loss_curve.csv``, ``loss_curve.png``). Reproducible from the seed on one machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusion_training import plot_curve, train, training_parser  # noqa: E402
from digits import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors  # noqa: E402

MODEL_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=2, num_layers=4,
    sample_size=IMAGE_SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, activation_fn="gelu-approximate",
    norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-6,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", clip_sample=False, variance_type="fixed_small")


def save_model(model, out: Path) -> None:
    from diffusers import DDPMScheduler

    model.save_pretrained(out / "transformer", safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")


def main(argv=None) -> None:
    args = training_parser(__doc__, Path("models/dit-digits"), "--class-dropout").parse_args(argv)

    from diffusers import DiTTransformer2DModel

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    images, labels = load_digits_tensors()

    def predict_batch(model, generator):
        index = torch.randint(0, images.shape[0], (args.batch_size,), generator=generator)
        x0, y = images[index], labels[index].clone()
        drop = torch.rand(y.shape, generator=generator) < args.class_dropout
        y[drop] = NUM_CLASSES  # the null class for classifier-free guidance
        return x0, lambda xt, t: model(xt, timestep=t, class_labels=y).sample

    _, seconds = train(DiTTransformer2DModel(**MODEL_CONFIG), predict_batch, args,
                       lambda ema: save_model(ema, args.out))
    write_record(args, seconds)


def write_record(args, seconds: float) -> None:
    config = {**vars(args), "out": str(args.out), "model": MODEL_CONFIG,
              "scheduler": SCHEDULER_CONFIG,
              "data": "sklearn.datasets.load_digits, 8x8 bilinear-upsampled to 16x16, scaled to [-1, 1]",
              "loss": "L_simple (epsilon MSE) + L_vlb (variance, stopped-gradient mean)",
              "train_seconds": round(seconds, 1), "torch": torch.__version__}
    (args.out / "training_config.json").write_text(json.dumps(config, indent=2) + "\n")
    plot_curve(args.out)


if __name__ == "__main__":
    main()
