"""Speed and size benchmark: writes docs/benchmarks.md.

For random-weight DiT-S/2 and DiT-B/2 shapes (batch 2, 256 tokens: 32x32x4 latents, patch 2), in one run:
compile time, artifact size, ONNX Runtime CPU latency of the FP32 export, the ditq W8A8 artifact and
ONNX Runtime's own ``quantize_static`` (per-channel QDQ, all ops and MatMul/Gemm only) on the same FP32
export calibrated on the same trajectories, and the output error of each against FP32.

    python bench/bench_speed.py            # both models, ~10 minutes on 2 cores
    python bench/bench_speed.py --models S # one
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (export_fp32, file_size_mb, latencies_ms, machine_description, quantize_static_baseline,  # noqa: E402
                    relative_l2, run_output, trajectory_batches)

SHAPES = {  # DiT paper sizes: hidden width, depth, heads
    "S": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12),
    "B": dict(num_attention_heads=12, attention_head_dim=64, num_layers=12),
}


def random_dit(size: str, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**SHAPES[size], in_channels=4, out_channels=8, sample_size=32, patch_size=2,
                                  num_embeds_ada_norm=1000).eval()
    with torch.no_grad():  # adaLN-zero starts at zero; random weights everywhere, as a trained model has
        for parameter in model.parameters():
            if parameter.dim() == 2 and parameter.abs().sum() == 0:
                parameter.normal_(0, 0.02)
    return model


def bench_model(size: str, work: Path, args) -> dict:
    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler import compile as compile_checkpoint
    from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG

    model = random_dit(size)
    checkpoint = work / f"dit-{size}"
    model.save_pretrained(checkpoint, safe_serialization=True)
    calibration = CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples)

    start = time.perf_counter()
    artifact = compile_checkpoint(checkpoint, work / f"dit-{size}-w8a8", CompileConfig(calibration=calibration))
    ditq_seconds = time.perf_counter() - start

    grouped = compile_checkpoint(checkpoint, work / f"dit-{size}-w8a8-g4",
                                 CompileConfig(calibration=calibration, groups=4, grouping="uniform"))

    fp32_path = work / f"dit-{size}-fp32.onnx"
    start = time.perf_counter()
    export_fp32(model, fp32_path)
    fp32_seconds = time.perf_counter() - start

    batches = trajectory_batches(model, DEFAULT_SCHEDULER_CONFIG, steps=calibration.steps,
                                 samples=calibration.samples, guidance_scale=calibration.guidance_scale,
                                 seed=calibration.seed)
    baselines = {}
    for name, matmul_only in (("quantize_static (all ops)", False), ("quantize_static (MatMul/Gemm)", True)):
        path = work / f"dit-{size}-{'mm' if matmul_only else 'all'}-qs.onnx"
        start = time.perf_counter()
        quantize_static_baseline(fp32_path, path, batches, matmul_only=matmul_only)
        baselines[name] = (path, fp32_seconds + time.perf_counter() - start)

    # Accuracy on denoiser inputs from a trajectory (noisy latents at real timesteps), batch 2.
    generator = torch.Generator().manual_seed(123)
    feeds = {"sample": torch.randn((2, 4, 32, 32), generator=generator).numpy(),
             "timestep": torch.tensor([500, 500]).numpy(), "class_labels": torch.tensor([207, 1000]).numpy()}
    eval_batches = [batches[len(batches) // 2], batches[-1]]
    reference = [run_output(fp32_path, b) for b in eval_batches]

    paths = {"FP32 export": fp32_path, "ditq W8A8 minmax": artifact.model_path,
             **{name: path for name, (path, _) in baselines.items()}, "ditq 4 groups": grouped.model_path}
    latency = latencies_ms(paths, feeds, rounds=args.runs)
    fp32_ms = latency["FP32 export"]
    rows = [("FP32 export", fp32_seconds, file_size_mb(fp32_path), fp32_ms, 0.0)]
    for name, (path, seconds) in [("ditq W8A8 minmax", (artifact.model_path, ditq_seconds)), *baselines.items()]:
        errors = [relative_l2(run_output(path, b), ref) for b, ref in zip(eval_batches, reference)]
        rows.append((name, seconds, file_size_mb(path), latency[name], max(errors)))
    # 4 timestep groups vs 1: the same inputs at one timestep (one branch runs), latency and size.
    groups = {"one_ms": latency["ditq W8A8 minmax"], "four_ms": latency["ditq 4 groups"],
              "one_mb": file_size_mb(artifact.model_path), "four_mb": file_size_mb(grouped.model_path),
              "compile_s": grouped.compile_log["compile_seconds"], "fused": grouped.manifest["fusion"]["fused_layers"],
              "layers": len(grouped.manifest["quantized_layers"])}
    return {"size": size, "rows": rows, "fp32_ms": fp32_ms, "groups": groups,
            "kernels": artifact.manifest["fusion"]["kernels"], "layers": len(artifact.manifest["quantized_layers"])}


def write_report(results: list[dict], args, path: Path) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Written by `python bench/bench_speed.py`; every number below comes from one run of it.",
        "",
        f"- Machine: {machine_description()}",
        f"- Date: {datetime.date.today().isoformat()}",
        "- Models: random-weight diffusers `DiTTransformer2DModel` with the DiT paper's shapes, 32x32x4 latents, "
        "patch 2 (256 tokens), 1000 classes; batch 2 (one guided sample); ONNX Runtime CPU provider, 2 intra-op "
        f"threads; every model of a table is timed in the same {args.runs} interleaved rounds (one run of each "
        "per round, after 3 warm-up runs each) and the median is reported.",
        f"- Calibration (ditq and both `quantize_static` rows): the same {args.calib_samples} samples x "
        f"{args.calib_steps} DDPM steps with guidance 4.0.",
        "- Error: relative L2 of the output vs the FP32 export on two denoiser inputs taken from those trajectories "
        "(mid-trajectory and last step); the larger of the two.",
        "- `quantize_static` rows run ONNX Runtime's quantizer on the same FP32 export (QDQ, per-channel, int8); "
        "their compile time includes that export.",
        "- Random weights have none of a trained DiT's activation outliers, so the errors here understate what "
        "quantization costs; quality on a trained model is measured in [quality.md](quality.md).",
        "- CUDA provider: not measured in this run (no GPU on the machine that ran it).",
        "",
    ]
    for result in results:
        lines += [f"## DiT-{result['size']}/2", "",
                  "| artifact | compile s | size MB | latency ms | speed-up vs FP32 | rel. L2 error vs FP32 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, seconds, size, ms, error in result["rows"]:
            lines.append(f"| {name} | {seconds:.1f} | {size:.1f} | {ms:.1f} | {result['fp32_ms'] / ms:.2f}x | "
                         f"{error:.2%} |")
        lines += ["", f"ditq: {result['layers']} quantized layers, ONNX Runtime kernels {result['kernels']}.", ""]
        g = result["groups"]
        growth = (g["four_mb"] - g["one_mb"]) / 3
        lines += [f"Timestep groups (W8A8 minmax, `--groups 4 --grouping uniform` vs 1 group): latency "
                  f"{g['four_ms']:.1f} ms vs {g['one_ms']:.1f} ms ({g['four_ms'] / g['one_ms'] - 1:+.1%}); size "
                  f"{g['four_mb']:.2f} MB vs {g['one_mb']:.2f} MB, {growth * 1e3:.1f} kB per extra group (the "
                  f"activation scales and the adaLN layers' int32 biases; int8 weights are shared); "
                  f"{g['fused']} of {g['layers']} layers fused in every branch; compile {g['compile_s']:.0f} s.", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["S", "B"], choices=sorted(SHAPES))
    parser.add_argument("--calib-steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ditq-bench-") as tmp:
        results = [bench_model(size, Path(tmp), args) for size in args.models]
    write_report(results, args, args.out)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
