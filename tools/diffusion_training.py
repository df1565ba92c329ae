"""What ditq's reference models share in training: the DDPM of DiT (1000 steps, linear betas, epsilon prediction,
learned sigma trained with improved DDPM's hybrid loss) and one training loop (AdamW, warm-up then cosine decay,
gradient clipping, EMA weights, a loss curve)."""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


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

    def loss(self, predict, x0: torch.Tensor, generator: torch.Generator):
        """``predict(x_t, t)``: the model's output, epsilon in the first half of the channels and the variance
        interpolation ``v`` in [-1, 1] in the second."""
        t = torch.randint(0, self.steps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        xt = self._at(self.sqrt_ac, t) * x0 + self._at(self.sqrt_1m_ac, t) * noise
        out = predict(xt, t)
        eps, v = out.chunk(2, dim=1)
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


def training_parser(description: str, out: Path, dropout: str) -> argparse.ArgumentParser:
    """The options both trainers take; ``dropout``: the conditioning-dropout flag (``--class-dropout``,
    ``--caption-dropout``), 10% by default, the unconditional half of classifier-free guidance."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument(dropout, type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=1000)
    return parser


def train(model, predict_batch, args, save) -> tuple[torch.nn.Module, float]:
    """Train ``model`` for ``args.steps`` steps. ``predict_batch(model, generator)`` draws a batch and returns
    ``(x0, predict)`` with ``predict(x_t, t)`` the model's output on it; ``save(ema)`` writes the EMA weights
    (every ``args.save_every`` steps and at the end, with ``loss_curve.csv``). Returns the EMA model and the
    seconds taken."""
    generator = torch.Generator().manual_seed(args.seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(200, args.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    diffusion = Diffusion()
    args.out.mkdir(parents=True, exist_ok=True)
    curve = ["step,loss,mse,vb,seconds"]
    start = time.time()
    running = None
    for step in range(1, args.steps + 1):
        x0, predict = predict_batch(model, generator)
        loss, mse, vb = diffusion.loss(predict, x0, generator)
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
            save(ema)
            (args.out / "loss_curve.csv").write_text("\n".join(curve) + "\n")
    return ema, time.time() - start


def plot_curve(out: Path, title: str = "reference DiT on digits: training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [line.split(",") for line in (out / "loss_curve.csv").read_text().split("\n")[1:] if line]
    steps = [int(r[0]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [float(r[2]) for r in rows], label="epsilon MSE")
    ax.plot(steps, [float(r[3]) for r in rows], label="L_vlb (bits/dim)")
    ax.set_xlabel("step"), ax.set_ylabel("loss (EMA of batches)"), ax.set_yscale("log"), ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=110)
