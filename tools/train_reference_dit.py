"""Train ditq's reference DiT: a class-conditional DiTTransformer2DModel on scikit-learn's digits.

Set up as DiT-XL/2 is, at toy scale: learned sigma (out channels = 2 x in), adaLN-zero, DDPM with 1000
steps and linear betas, epsilon prediction, 10% class dropout for classifier-free guidance, the hybrid
loss ``L_simple + L_vlb`` (improved DDPM; the variance term sees a stopped-gradient mean), EMA weights.

    python tools/train_reference_dit.py --out models/dit-digits --steps 7000 --seed 0

Writes ``transformer/`` and ``scheduler/`` (diffusers layout), ``training_config.json`` and the loss
curve (``loss_curve.csv``, ``loss_curve.png``). Reproducible from the seed on one machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors  # noqa: E402

MODEL_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=2, num_layers=4,
    sample_size=IMAGE_SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, activation_fn="gelu-approximate",
    norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-6,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", clip_sample=False, variance_type="fixed_small")


class Diffusion:
    """Closed-form DDPM quantities for the linear schedule."""

    def __init__(self, steps: int = 1000):
        betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
        alphas = 1 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt().float(), (1 - ac).sqrt().float()
        self.log_betas = betas.log().float()
        self.post_log_var = torch.cat([post_var[1:2], post_var[1:]]).log().float()
        self.coef_x0 = (betas * ac_prev.sqrt() / (1 - ac)).float()
        self.coef_xt = ((1 - ac_prev) * alphas.sqrt() / (1 - ac)).float()
        self.steps = steps

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return values[t][:, None, None, None]

    def loss(self, model, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        t = torch.randint(0, self.steps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        xt = self._at(self.sqrt_ac, t) * x0 + self._at(self.sqrt_1m_ac, t) * noise
        out = model(xt, timestep=t, class_labels=labels).sample
        eps, v = out[:, :1], out[:, 1:]
        mse = F.mse_loss(eps, noise)
        # L_vlb on the variance only: the mean comes from a stopped-gradient epsilon.
        frac = (v + 1) / 2
        model_log_var = frac * self._at(self.log_betas, t) + (1 - frac) * self._at(self.post_log_var, t)
        pred_x0 = (xt - self._at(self.sqrt_1m_ac, t) * eps.detach()) / self._at(self.sqrt_ac, t)
        model_mean = self._at(self.coef_x0, t) * pred_x0 + self._at(self.coef_xt, t) * xt
        true_mean = self._at(self.coef_x0, t) * x0 + self._at(self.coef_xt, t) * xt
        true_log_var = self._at(self.post_log_var, t)
        kl = 0.5 * (-1 + model_log_var - true_log_var + (true_log_var - model_log_var).exp()
                    + (true_mean - model_mean) ** 2 * (-model_log_var).exp())
        vb = kl.mean() / math.log(2.0)
        return mse + vb, mse.detach(), vb.detach()


def save_model(model, out: Path) -> None:
    from diffusers import DDPMScheduler

    model.save_pretrained(out / "transformer", safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/dit-digits"))
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--class-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=1000)
    args = parser.parse_args(argv)

    from diffusers import DiTTransformer2DModel

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_tensors()
    model = DiTTransformer2DModel(**MODEL_CONFIG)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(200, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    diffusion = Diffusion()
    args.out.mkdir(parents=True, exist_ok=True)
    curve = ["step,loss,mse,vb,seconds"]
    start = time.time()
    running = None
    for step in range(1, args.steps + 1):
        index = torch.randint(0, images.shape[0], (args.batch_size,), generator=generator)
        x0, y = images[index], labels[index].clone()
        drop = torch.rand(y.shape, generator=generator) < args.class_dropout
        y[drop] = NUM_CLASSES  # the null class for classifier-free guidance
        loss, mse, vb = diffusion.loss(model, x0, y, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
        values = torch.stack([loss.detach(), mse, vb])
        running = values if running is None else 0.98 * running + 0.02 * values
        if step % 50 == 0:
            curve.append(f"{step},{running[0]:.5f},{running[1]:.5f},{running[2]:.5f},{time.time() - start:.1f}")
            print(f"step {step}/{args.steps} loss {running[0]:.4f} (mse {running[1]:.4f}, vb {running[2]:.4f}) "
                  f"{time.time() - start:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_model(ema, args.out)
            (args.out / "loss_curve.csv").write_text("\n".join(curve) + "\n")
    write_record(args, time.time() - start)


def write_record(args, seconds: float) -> None:
    config = {**vars(args), "out": str(args.out), "model": MODEL_CONFIG,
              "scheduler": SCHEDULER_CONFIG,
              "data": "sklearn.datasets.load_digits, 8x8 bilinear-upsampled to 16x16, scaled to [-1, 1]",
              "loss": "L_simple (epsilon MSE) + L_vlb (variance, stopped-gradient mean)",
              "train_seconds": round(seconds, 1), "torch": torch.__version__}
    (args.out / "training_config.json").write_text(json.dumps(config, indent=2) + "\n")
    plot_curve(args.out)


def plot_curve(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [line.split(",") for line in (out / "loss_curve.csv").read_text().split("\n")[1:] if line]
    steps = [int(r[0]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [float(r[2]) for r in rows], label="epsilon MSE")
    ax.plot(steps, [float(r[3]) for r in rows], label="L_vlb (bits/dim)")
    ax.set_xlabel("step"), ax.set_ylabel("loss (EMA of batches)"), ax.set_yscale("log"), ax.legend()
    ax.set_title("reference DiT on digits: training loss")
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=110)


if __name__ == "__main__":
    main()
