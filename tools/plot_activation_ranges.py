"""Plot per-channel activation ranges over timesteps for a few layers of a DiT (the outliers that make DiT
quantization hard), from ditq's own calibration statistics.

    python tools/plot_activation_ranges.py models/dit-digits --out docs/activation_ranges.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/activation_ranges.png"))
    parser.add_argument("--calib-steps", type=int, default=50)
    parser.add_argument("--calib-samples", type=int, default=10)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler.pipeline import run_pipeline

    config = CompileConfig(calibration=CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples))
    stats = run_pipeline(args.checkpoint, config).context.stats
    chosen = _pick_tensors(stats)
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 3.6), squeeze=False)
    for ax, (title, tensor) in zip(axes[0], chosen):
        timesteps = tensor.timesteps
        absmax = torch.stack([torch.maximum(tensor.per_timestep[t].channel_max.abs(),
                                            tensor.per_timestep[t].channel_min.abs()) for t in timesteps])  # [T, C]
        top = absmax.amax(0).topk(4).indices
        for channel in top.tolist():
            ax.plot(timesteps, absmax[:, channel], label=f"channel {channel}")
        ax.plot(timesteps, absmax.median(1).values, "k--", label="median channel")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("timestep")
        ax.invert_xaxis()
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("max |activation| over tokens and samples")
    fig.suptitle("per-channel input ranges of quantized layers along sampling trajectories", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def _pick_tensors(stats):
    """The input of qkv, attention output, fc2 (after GELU) and the adaLN linear, from a few blocks."""
    by_layer = {}
    for tensor in stats.tensors.values():
        for layer in tensor.consumers:
            by_layer[layer] = tensor
    blocks = sorted({int(name.split(".")[1]) for name in by_layer})
    last = blocks[-1]
    wanted = [("transformer_blocks.0.attn1.to_q", "block 0 q/k/v input"),
              (f"transformer_blocks.{last}.attn1.to_out.0", f"block {last} attention-output input"),
              (f"transformer_blocks.{last}.ff.net.2", f"block {last} fc2 input (after GELU)"),
              (f"transformer_blocks.{last}.norm1.linear", f"block {last} adaLN input (SiLU(c))")]
    return [(title, by_layer[name]) for name, title in wanted if name in by_layer]


if __name__ == "__main__":
    main()
