"""Quality benchmark on the reference DiT: writes docs/quality.md and its plots.

Rows: FP32 (the FP32 ONNX export), ONNX Runtime's ``quantize_static`` W8A8 on that export (all ops, and
MatMul/Gemm only; calibrated on the same trajectories as ditq), and every ditq format x recipe that exists.
Each row samples the same seeds and classes with the checkpoint's scheduler (DDPM) at 50 and 100 steps, all
in ONNX Runtime on the CPU provider, in one run. Columns: our FID (Fréchet distance in the digit classifier's
feature space, against all 1797 real digits), class accuracy, PSNR and relative L2 of the final samples vs
FP32 from the same noise. A plot shows each row's relative denoiser error per timestep on the FP32
trajectory's inputs.

    python bench/bench_quality.py                  # ~15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
from common import export_fp32, machine_description, quantize_static_baseline, trajectory_batches  # noqa: E402
from digits import load_digits_tensors  # noqa: E402
from evaluator import features_and_logits, frechet_distance, load_classifier, psnr, relative_l2  # noqa: E402

# ditq rows: (label, CompileConfig keyword arguments). Later recipes and formats add rows here.
DITQ_ROWS = [("ditq W8A8 minmax", dict(format="w8a8", recipe="minmax"))] + [
    (f"ditq W8A8 minmax, {groups} groups {grouping}", dict(format="w8a8", recipe="minmax", groups=groups,
                                                          grouping=grouping))
    for groups in (2, 4, 8) for grouping in ("uniform", "htg")
]


def ort_denoiser(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def denoise(x, t, y):
        return torch.from_numpy(session.run(["out"], {"sample": x.numpy(), "timestep": t.numpy(),
                                                      "class_labels": y.numpy()})[0])
    return denoise


def build_rows(checkpoint: Path, work: Path, args) -> dict[str, Path]:
    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler import compile as compile_checkpoint
    from ditq_compiler.loading import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    calibration = CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples,
                                    guidance_scale=args.guidance_scale)
    rows = {"FP32": work / "fp32.onnx"}
    export_fp32(loaded.model, rows["FP32"])
    batches = trajectory_batches(loaded.model, loaded.scheduler_config, steps=calibration.steps,
                                 samples=calibration.samples, guidance_scale=calibration.guidance_scale,
                                 seed=calibration.seed)
    for label, matmul_only in (("ORT quantize_static W8A8 (all ops)", False),
                               ("ORT quantize_static W8A8 (MatMul/Gemm)", True)):
        rows[label] = work / f"qs-{'mm' if matmul_only else 'all'}.onnx"
        quantize_static_baseline(rows["FP32"], rows[label], batches, matmul_only=matmul_only)
    for index, (label, options) in enumerate(DITQ_ROWS):
        artifact = compile_checkpoint(loaded.source, work / f"ditq-{index}",
                                      CompileConfig(calibration=calibration, **options))
        rows[label] = artifact.model_path
    return rows, loaded


def evaluate(rows: dict[str, Path], loaded, args):
    from ditq_compiler.sampling import iterate_sampling, sample

    classifier = load_classifier(ROOT / "models" / "digits-classifier")
    real, _ = load_digits_tensors()
    real_features, _ = features_and_logits(classifier, real)
    labels = [i % 10 for i in range(args.samples)]
    results, samples_by_row = {}, {}
    for steps in args.steps:
        fp_samples = None
        for label, path in rows.items():
            samples = sample(ort_denoiser(path), loaded.scheduler_config, loaded.model_config, labels, steps=steps,
                             guidance_scale=args.guidance_scale, seed=args.seed)
            feats, logits = features_and_logits(classifier, samples)
            accuracy = float((logits.argmax(1) == torch.tensor(labels)).float().mean())
            fid = frechet_distance(feats, real_features)
            if label == "FP32":
                fp_samples = samples
            results[(label, steps)] = dict(fid=fid, accuracy=accuracy, psnr=psnr(samples, fp_samples),
                                           rel_l2=relative_l2(samples, fp_samples))
            samples_by_row[(label, steps)] = samples
            print(f"{steps} steps  {label:<40} FID {fid:7.3f}  acc {accuracy:.3f}  "
                  f"PSNR {results[(label, steps)]['psnr']:.2f}", flush=True)

    # Per-timestep denoiser error, on the FP32 trajectory's inputs (teacher forcing).
    fp = ort_denoiser(rows["FP32"])
    inputs = []

    def record(x, t, y):
        inputs.append((x, t, y))
        return fp(x, t, y)

    for _ in iterate_sampling(record, loaded.scheduler_config, loaded.model_config, labels[:args.trajectory_samples],
                              steps=args.steps[0], guidance_scale=args.guidance_scale, seed=args.seed):
        pass
    per_timestep = {}
    for label, path in rows.items():
        if label == "FP32":
            continue
        denoise = ort_denoiser(path)
        per_timestep[label] = [(int(t[0]), relative_l2(denoise(x, t, y), fp(x, t, y))) for x, t, y in inputs]
    return results, samples_by_row, per_timestep


def plot_timestep_error(per_timestep: dict, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in per_timestep.items():
        ax.plot([t for t, _ in points], [e for _, e in points], marker=".", label=label)
    ax.set_xlabel("timestep (sampling runs from 999 down to 0)")
    ax.set_ylabel("relative L2 error of the denoiser output vs FP32")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_title(f"per-timestep error on the FP32 trajectory ({steps} DDPM steps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(samples_by_row: dict, path: Path, steps: int, per_class: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for (label, s) in samples_by_row if s == steps]
    fig, axes = plt.subplots(len(labels), 1, figsize=(8, 1.1 * len(labels) + 0.4))
    for ax, label in zip(np.atleast_1d(axes), labels):
        samples = samples_by_row[(label, steps)][:10 * per_class]
        strip = torch.cat(list(samples.clamp(-1, 1)[:, 0]), dim=1).numpy()
        ax.imshow(strip, cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"same noise, classes 0-9, {steps} DDPM steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results, per_timestep, args, out: Path, seconds: float) -> None:
    lines = [
        "# Quality on the reference DiT",
        "",
        "Written by `python bench/bench_quality.py`; every number below comes from one run of it.",
        "",
        f"- Machine: {machine_description()}; date {datetime.date.today().isoformat()}; "
        f"the run took {seconds / 60:.1f} minutes.",
        "- Model: `models/dit-digits` (class-conditional DiT, learned sigma, trained on scikit-learn's digits at "
        "16x16; see [reference_model.md](reference_model.md)).",
        f"- Sampling: DDPM (the checkpoint's scheduler), guidance {args.guidance_scale}, {args.samples} samples "
        f"(classes 0-9 in turn), seed {args.seed}; the same noise for every row. All rows run in ONNX Runtime "
        "(CPU provider).",
        f"- Calibration, ditq and `quantize_static` alike: {args.calib_samples} samples x {args.calib_steps} DDPM "
        f"steps, guidance {args.guidance_scale}, the same trajectories.",
        "- FID: Fréchet distance between generated and all 1797 real digits in the feature space (128-d) of "
        "`models/digits-classifier` (held-out accuracy 99.7%). Accuracy: that classifier's agreement with the "
        "class each sample was generated for. PSNR (peak-to-peak 2) and relative L2: final samples vs FP32 "
        "from the same noise.",
        "",
        "| steps | row | FID ↓ | class accuracy ↑ | PSNR vs FP32 (dB) ↑ | rel. L2 vs FP32 ↓ |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for (label, steps), r in results.items():
        psnr_text = "—" if label == "FP32" else f"{r['psnr']:.2f}"
        l2_text = "—" if label == "FP32" else f"{r['rel_l2']:.4f}"
        lines.append(f"| {steps} | {label} | {r['fid']:.3f} | {r['accuracy']:.1%} | {psnr_text} | {l2_text} |")
    lines += ["", "![per-timestep error](quality_timestep_error.png)", "",
              f"![samples, {args.steps[0]} steps](quality_samples.png)", ""]
    lines += findings(results, per_timestep, args)
    out.write_text("\n".join(lines) + "\n")


def findings(results, per_timestep, args) -> list[str]:
    """What the table says, computed from it (no number here is typed by hand)."""
    base = "ditq W8A8 minmax"
    lines = ["## Reading the table", ""]
    for steps in args.steps:
        ours = results[(base, steps)]["psnr"]
        for label in ("ORT quantize_static W8A8 (all ops)", "ORT quantize_static W8A8 (MatMul/Gemm)"):
            theirs = results[(label, steps)]["psnr"]
            verdict = "ahead of" if ours > theirs else "behind"
            lines.append(f"- {steps} steps: ditq W8A8 ({ours:.2f} dB) is {ours - theirs:+.2f} dB {verdict} {label} "
                         f"({theirs:.2f} dB) in PSNR vs FP32.")
        grouped = {label: r["psnr"] for (label, s), r in results.items() if s == steps and "groups" in label}
        best = max(grouped, key=grouped.get)
        lines.append(f"- {steps} steps: the best timestep-grouped row is {best} ({grouped[best]:.2f} dB, "
                     f"{grouped[best] - ours:+.2f} dB vs one group); the worst is "
                     f"{min(grouped, key=grouped.get)} ({min(grouped.values()):.2f} dB).")
    fp_fid = {steps: results[("FP32", steps)]["fid"] for steps in args.steps}
    below = [(label, s, r) for (label, s), r in results.items() if label != "FP32" and r["fid"] < fp_fid[s]]
    if below:
        label, s, r = min(below, key=lambda item: item[2]["psnr"])
        lines.append(f"- FID over {args.samples} samples does not rank these rows: {label} at {s} steps is "
                     f"{r['psnr']:.2f} dB from FP32 yet scores FID {r['fid']:.1f}, below FP32's {fp_fid[s]:.1f}. "
                     "Class accuracy saturates as well; PSNR / relative L2 vs FP32 is the measure that separates "
                     "the rows here.")
    first = max(1, len(next(iter(per_timestep.values()))) // 5)
    one = per_timestep[base]
    early_one = sum(e for _, e in one[:first]) / first
    late_one = sum(e for _, e in one[-first:]) / first
    lines.append(f"- Per-timestep error of the denoiser (plot): over the first {first} (noisiest) steps ditq with one "
                 f"group averages {early_one:.4f}, over the last {first} steps {late_one:.4f}; with groups:")
    for label, points in per_timestep.items():
        if "groups" in label:
            early = sum(e for _, e in points[:first]) / first
            late = sum(e for _, e in points[-first:]) / first
            lines.append(f"  {label}: {early:.4f} ({early / early_one - 1:+.0%}) and {late:.4f} "
                         f"({late / late_one - 1:+.0%}).")
    worst = {label: max(e for _, e in pts) for label, pts in per_timestep.items()}
    lines.append("- Largest per-timestep error along the trajectory: " +
                 "; ".join(f"{label} {value:.4f}" for label, value in worst.items()) + ".")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "dit-digits")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-steps", type=int, default=25)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--trajectory-samples", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ditq-quality-") as tmp:
        rows, loaded = build_rows(args.checkpoint, Path(tmp), args)
        results, samples_by_row, per_timestep = evaluate(rows, loaded, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_timestep_error(per_timestep, args.out.parent / "quality_timestep_error.png", args.steps[0])
    plot_samples(samples_by_row, args.out.parent / "quality_samples.png", args.steps[0])
    write_report(results, per_timestep, args, args.out, time.perf_counter() - start)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
