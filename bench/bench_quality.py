"""Quality benchmark on the reference DiT: writes docs/quality.md and its plots.

Rows (bench/quality_rows.py, one registry): FP32 (the FP32 ONNX export), ONNX Runtime's ``quantize_static``
W8A8 on that export (all ops, and MatMul/Gemm only; calibrated on the same trajectories as ditq), and ditq
W8A8 with every smoothing recipe, with one set of activation parameters and with 4 HTG timestep groups. Each
row samples the same seeds and classes with the checkpoint's scheduler (DDPM) at every ``--steps``, all in
ONNX Runtime on the CPU provider. Columns: KID per class vs FP32 (the kernel distance between the row's
samples and an FP32 sample set from another seed, in the digit classifier's 128-d features; 0: as close as
two FP32 sample sets), class accuracy, PSNR and relative L2 of the final samples vs FP32 from the same noise.
A plot shows each row's relative denoiser error per timestep on the FP32 trajectory's inputs.
``--metric-study`` instead writes docs/quality_metric.md: the study that chose KID per class vs FP32.

    python bench/bench_quality.py                      # every row, 50 and 100 steps: ~30 minutes on 2 cores
    python bench/bench_quality.py --rows '*W8A8 minmax' '*W8A8 htg' --steps 50 --samples 50 --out /tmp/q.md
    python bench/bench_quality.py --metric-study --study-cache /tmp/ditq-study.npz     # ~15 minutes
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
import quality_rows as qr  # noqa: E402
from common import machine_description, marked_blocks, work_directory  # noqa: E402
from digits import load_digits_tensors  # noqa: E402
from evaluator import (class_kernel_distance, features_and_logits, frechet_distance, jackknife_std,  # noqa: E402
                       load_classifier, psnr_jackknife, relative_l2)


@dataclass
class RowResult:
    """One row at one step count. ``*_loo``: leave-one-sample-out values, for jackknife errors of the value
    and of paired differences between rows (every row samples the same noise)."""

    kid: float
    kid_loo: np.ndarray
    accuracy: float
    psnr: float
    psnr_loo: np.ndarray | None
    rel_l2: float
    fid_real: float  # the metric this benchmark used to report, kept to say why it changed
    seconds: float

    @property
    def kid_std(self) -> float:
        return jackknife_std(self.kid_loo)

    @property
    def psnr_std(self) -> float:
        return float("nan") if self.psnr_loo is None else jackknife_std(self.psnr_loo)


def score_row(samples: torch.Tensor, fp_samples: torch.Tensor, classes: np.ndarray, classifier,
              reference_features, seconds: float, real_features=None) -> RowResult:
    """One row's columns: KID per class vs the FP32 reference samples (``reference_features``, other noise), the
    classifier's accuracy on ``classes``, PSNR (jackknifed) and relative L2 vs ``fp_samples`` (the same noise;
    ``samples is fp_samples`` for the FP32 row itself), and FID vs the real digits where ``real_features`` are
    given."""
    feats, logits = features_and_logits(classifier, samples)
    kid, kid_loo = class_kernel_distance(feats, classes, reference_features, classes)
    psnr_value, psnr_loo = (float("inf"), None) if samples is fp_samples else psnr_jackknife(samples, fp_samples)
    return RowResult(kid=kid, kid_loo=kid_loo,
                     accuracy=float((logits.argmax(1) == torch.as_tensor(classes)).float().mean()),
                     psnr=psnr_value, psnr_loo=psnr_loo, rel_l2=relative_l2(samples, fp_samples),
                     fid_real=float("nan") if real_features is None else frechet_distance(feats, real_features),
                     seconds=seconds)


def table_lines(results: dict, failed: dict[str, str]) -> list[str]:
    """The results table, and the rows that could not be built (a peer's own failure is a result too)."""
    lines = ["| steps | row | KID vs FP32 ↓ | class accuracy ↑ | PSNR vs FP32 (dB) ↑ | rel. L2 vs FP32 ↓ |",
             "|---:|---|---:|---:|---:|---:|"]
    for (label, steps), r in results.items():
        psnr_text = "—" if label == qr.FP32 else f"{r.psnr:.2f} ± {r.psnr_std:.2f}"
        l2_text = "—" if label == qr.FP32 else f"{r.rel_l2:.4f}"
        lines.append(f"| {steps} | {label} | {r.kid:.0f} ± {r.kid_std:.0f} | {r.accuracy:.1%} | {psnr_text} | "
                     f"{l2_text} |")
    if failed:
        lines += ["", "Rows that could not be built or loaded (not in the table):", ""]
        lines += [f"- {label}: {message}" for label, message in failed.items()]
    return lines


def evaluate(rows: dict[str, Path], loaded, args):
    from ditq_compiler.families import DIT

    classifier = load_classifier(ROOT / "models" / "digits-classifier")
    real, _ = load_digits_tensors()
    real_features, _ = features_and_logits(classifier, real)
    labels = qr.class_labels(args.samples)
    classes = np.array(labels)
    results, samples_by_row = {}, {}
    for steps in args.steps:
        # The reference of KID: FP32 from independent noise (seed + 1), as many samples as every row.
        reference = qr.sample_row(rows[qr.FP32], loaded, args.samples, steps=steps,
                                  guidance_scale=args.guidance_scale, seed=args.seed + 1)
        reference_features, _ = features_and_logits(classifier, reference)
        fp_samples = None
        for label, path in rows.items():
            start = time.perf_counter()
            samples = qr.sample_row(path, loaded, args.samples, steps=steps, guidance_scale=args.guidance_scale,
                                    seed=args.seed)
            seconds = time.perf_counter() - start
            if label == qr.FP32:
                fp_samples = samples
            result = score_row(samples, fp_samples, classes, classifier, reference_features, seconds,
                               real_features=real_features)
            results[(label, steps)] = result
            samples_by_row[(label, steps)] = samples
            print(f"{steps} steps  {label:<42} KID {result.kid:9.1f} ± {result.kid_std:7.1f}  "
                  f"acc {result.accuracy:.3f}  PSNR {result.psnr:6.2f}  ({seconds:.0f} s)", flush=True)

    # Per-timestep denoiser error, on the FP32 trajectory's inputs (teacher forcing).
    fp = qr.ort_denoiser(rows[qr.FP32])
    inputs = []

    def record(x, t, y):
        inputs.append((x, t, y))
        return fp(x, t, y)

    for _ in DIT.iterate_sampling(record, loaded.scheduler_config, loaded.model_config, labels[:args.trajectory_samples],
                              steps=args.steps[0], guidance_scale=args.guidance_scale, seed=args.seed):
        pass
    per_timestep = {}
    for label, path in rows.items():
        if label == qr.FP32:
            continue
        denoise = qr.ort_denoiser(path)
        per_timestep[label] = [(int(t[0]), relative_l2(denoise(x, t, y), fp(x, t, y))) for x, t, y in inputs]
    return results, samples_by_row, per_timestep


def plot_timestep_error(per_timestep: dict, path: Path, steps: int, sampler: str = "DDPM") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in per_timestep.items():
        ax.plot([t for t, _ in points], [e for _, e in points], marker=".", label=label)
    ax.set_xlabel("timestep (sampling runs from 999 down to 0)")
    ax.set_ylabel("relative L2 error of the denoiser output vs FP32")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_title(f"per-timestep error on the FP32 trajectory ({steps} {sampler} steps)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(samples_by_row: dict, path: Path, steps: int, per_class: int = 1, sampler: str = "DDPM") -> None:
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
    fig.suptitle(f"same noise, classes 0-9, {steps} {sampler} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metric_paragraph(results: dict, args) -> list[str]:
    """Why the table reports KID per class vs FP32 and no longer FID vs the real digits, with this run's
    numbers."""
    steps = args.steps[0]
    fp = results[(qr.FP32, steps)]
    others = {label: r for (label, s), r in results.items() if s == steps and label != qr.FP32}
    text = ("**Why KID vs FP32, not FID.** This table used to report FID against the 1797 real digits in the "
            "same features. [The study](quality_metric.md), which compares FID, KID and KID per class in four "
            "feature spaces against the real digits and against FP32, finds the distance to the real digits set "
            "by guidance rather than by quantization error, so it does not rank the rows as PSNR does")
    if others:
        worst = min(others, key=lambda label: others[label].psnr)
        r = others[worst]
        relation = "lower (closer to the data) than" if r.fid_real < fp.fid_real else "against"
        text += (f"; in this run ({steps} steps) it scores {worst}, {r.psnr:.2f} dB from FP32, at "
                 f"{r.fid_real:.1f}, {relation} FP32's {fp.fid_real:.1f}")
    text += (". KID per class against FP32 samples from other noise (the unbiased squared MMD of Bińkowski et al. "
             "2018 with the cubic polynomial kernel, averaged over the 10 classes) is 0 in expectation for a model "
             "that samples as FP32 does, at any sample count. ± is the jackknife standard error (leave one "
             "sample out), which the study compares with the spread it observes.")
    return [text, ""]


def write_report(results, per_timestep, failed: dict[str, str], args, out: Path, seconds: float) -> None:
    import json

    classifier_info = json.loads((ROOT / "models" / "digits-classifier" / "classifier.json").read_text())
    held_out = classifier_info["held_out_accuracy"]
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
        f"- KID vs FP32: class-conditional kernel distance between the row's samples and {args.samples} FP32 "
        f"samples from seed {args.seed + 1}, in the 128-d feature space of `models/digits-classifier` (held-out "
        f"accuracy {held_out:.1%}); 0 = as close as two FP32 sample sets. Accuracy: that classifier's agreement "
        "with the class each sample was generated for. PSNR (peak-to-peak 2) and relative L2: final samples vs "
        "FP32 from the same noise.",
        "",
    ]
    lines += metric_paragraph(results, args)
    lines += table_lines(results, failed)
    lines += ["", f"![per-timestep error]({args.out.stem}_timestep_error.png)", "",
              f"![samples, {args.steps[0]} steps]({args.out.stem}_samples.png)", ""]
    lines += findings(results, per_timestep, args)
    for block in marked_blocks(out):  # sections other benchmarks write (the PixArt rows), kept as they are
        lines += ["", *block]
    out.write_text("\n".join(lines).rstrip("\n") + "\n")


def baseline_of(label: str) -> str | None:
    """The row a ditq row is compared with: a reconstructed row without its reconstruction, a rotated row
    without its rotation, a row with integer attention with the same configuration in float attention (and one
    with the embedders quantized with them in float), a recipe row the same configuration with the minmax
    recipe, and any other minmax row, W8A8 minmax with one group. None for the peers and for ditq W8A8 minmax
    itself."""
    options = qr.DITQ_ROWS.get(label)
    if options is None or label == qr.BASE:
        return None
    for option in ("reconstruct", "rotate", "quantize_attention", "quantize_embedders"):
        if option in options:
            want = {k: v for k, v in options.items() if k != option}
            return next((other for other, o in qr.DITQ_ROWS.items() if o == want), qr.BASE)
    if options.get("recipe", "minmax") != "minmax":
        want = {**options, "recipe": "minmax"}
        return next((other for other, o in qr.DITQ_ROWS.items() if o == want), None)
    return qr.BASE


def compare(a: RowResult, b: RowResult) -> tuple[float, float, float, float]:
    """``a`` vs ``b`` on the same noise: (PSNR difference, its jackknife std, KID difference, its std)."""
    return (a.psnr - b.psnr, jackknife_std(a.psnr_loo - b.psnr_loo),
            a.kid - b.kid, jackknife_std(a.kid_loo - b.kid_loo))


def verdict(diff: float, std: float, higher_is_better: bool) -> str:
    """``better`` / ``worse`` when the difference exceeds twice its standard error, else ``within noise``."""
    if abs(diff) <= 2 * std:
        return "within noise"
    return "better" if (diff > 0) == higher_is_better else "worse"


def findings(results: dict, per_timestep: dict, args) -> list[str]:
    """What the table says, computed from it (no number here is typed by hand)."""
    lines = ["## Reading the table", ""]
    for steps in args.steps:
        at = {label: r for (label, s), r in results.items() if s == steps}
        fp = at[qr.FP32]
        if qr.BASE in at:
            ours = at[qr.BASE]
            for peer in qr.QUANTIZE_STATIC_ROWS:
                if peer in at:
                    theirs = at[peer]
                    lines.append(f"- {steps} steps: ditq W8A8 minmax is {ours.psnr - theirs.psnr:+.2f} dB vs {peer} "
                                 f"in PSNR ({ours.psnr:.2f} vs {theirs.psnr:.2f} dB) and {ours.kid - theirs.kid:+.0f} "
                                 f"in KID ({ours.kid:.0f} vs {theirs.kid:.0f}).")
        same_as_fp = [label for label, r in at.items() if label != qr.FP32
                      and verdict(r.kid - fp.kid, jackknife_std(r.kid_loo - fp.kid_loo), False) == "within noise"]
        distinct = [label for label in at if label != qr.FP32 and label not in same_as_fp]
        lines.append(f"- {steps} steps, KID: {len(same_as_fp)} of {len(at) - 1} rows within noise of FP32 (its own KID "
                     f"{fp.kid:.0f} ± {fp.kid_std:.0f}, paired differences within twice their jackknife std)"
                     + (f"; further from FP32: {', '.join(distinct)}." if distinct else "."))
        by_format: dict[str, list[str]] = {}
        for label in at:
            if label in qr.DITQ_ROWS:
                by_format.setdefault(qr.DITQ_ROWS[label]["format"], []).append(label)
        for fmt, labels in by_format.items():
            best = max(labels, key=lambda label: at[label].psnr)
            lines.append(f"- {steps} steps, best {fmt} row by PSNR vs FP32: {best} ({at[best].psnr:.2f} dB, "
                         f"KID {at[best].kid:.0f} vs FP32's {fp.kid:.0f}); worst: "
                         f"{min(labels, key=lambda label: at[label].psnr)} "
                         f"({min(at[label].psnr for label in labels):.2f} dB), of {len(labels)} rows.")
        compared = [(label, baseline_of(label)) for label in at if baseline_of(label) in at]
        if not compared:
            continue
        lines += ["", f"{steps} steps, each ditq row against its baseline on the same noise (± jackknife std of "
                  "the paired difference; *better* / *worse*: beyond twice that):", "",
                  "| row | baseline | Δ PSNR (dB) | | Δ KID vs FP32 | |", "|---|---|---:|---|---:|---|"]
        summary: dict[tuple[str, str, str], list[str]] = {}
        for label, base in compared:
            d_psnr, s_psnr, d_kid, s_kid = compare(at[label], at[base])
            v_psnr, v_kid = verdict(d_psnr, s_psnr, True), verdict(d_kid, s_kid, False)
            lines.append(f"| {label} | {base} | {d_psnr:+.2f} ± {s_psnr:.2f} | {v_psnr} | "
                         f"{d_kid:+.0f} ± {s_kid:.0f} | {v_kid} |")
            summary.setdefault((base, "PSNR", v_psnr), []).append(label)
            summary.setdefault((base, "KID", v_kid), []).append(label)
        lines.append("")
        for base in dict.fromkeys(base for _, base in compared):
            for metric in ("PSNR", "KID"):
                parts = [f"{v}: {', '.join(summary[(base, metric, v)])}" for v in ("better", "worse", "within noise")
                         if (base, metric, v) in summary]
                lines.append(f"- {steps} steps, against {base}, in {metric}: " + "; ".join(parts) + ".")
        lines.append("")
    if qr.BASE in per_timestep:
        first = max(1, len(next(iter(per_timestep.values()))) // 5)
        one = per_timestep[qr.BASE]
        early_one = sum(e for _, e in one[:first]) / first
        late_one = sum(e for _, e in one[-first:]) / first
        others = [label for label in per_timestep if label in qr.DITQ_ROWS and label != qr.BASE]
        lines.append(f"- Per-timestep error of the denoiser (plot): over the first {first} (noisiest) steps "
                     f"{qr.BASE} averages {early_one:.4f}, over the last {first} steps {late_one:.4f}"
                     + ("; the other ditq rows:" if others else "."))
        for label, points in per_timestep.items():
            if label in others:
                early = sum(e for _, e in points[:first]) / first
                late = sum(e for _, e in points[-first:]) / first
                lines.append(f"  {label}: {early:.4f} ({early / early_one - 1:+.0%}) and {late:.4f} "
                             f"({late / late_one - 1:+.0%}).")
    worst = {label: max(e for _, e in pts) for label, pts in per_timestep.items()}
    if worst:
        lines.append("- Largest per-timestep error along the trajectory: " +
                     "; ".join(f"{label} {value:.4f}" for label, value in worst.items()) + ".")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "dit-digits")
    parser.add_argument("--rows", nargs="+", metavar="PATTERN",
                        help="rows whose label contains PATTERN (or matches it as a glob: * ? [), case-insensitive; "
                             "FP32 is always kept. Rows: " + "; ".join(qr.ALL_ROWS))
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-steps", type=int, default=25)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--trajectory-samples", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    parser.add_argument("--work", type=Path, help="keep the built models here and reuse those built from the same "
                        "checkpoint and configuration (default: a temporary directory); empty it after changing "
                        "the compiler")
    study = parser.add_argument_group("metric study (--metric-study writes --study-out instead of --out)")
    study.add_argument("--metric-study", action="store_true")
    study.add_argument("--study-samples", type=int, default=500, help="samples per row, a multiple of 100")
    study.add_argument("--study-steps", type=int, default=50)
    study.add_argument("--study-cache", type=Path, help="npz of the study's samples: read if it holds the same "
                       "settings, else written")
    study.add_argument("--study-out", type=Path, default=ROOT / "docs" / "quality_metric.md")
    args = parser.parse_args()
    if args.samples < 30 or args.samples % 10:
        parser.error("--samples must be a multiple of 10, at least 30 (KID per class needs 3 samples per class)")
    if args.metric_study and (args.study_samples < 200 or args.study_samples % 100):
        parser.error("--study-samples must be a multiple of 100, at least 200")
    start = time.perf_counter()
    if args.metric_study:
        import quality_study

        with tempfile.TemporaryDirectory(prefix="ditq-quality-study-") as tmp:
            samples, sampled = quality_study.generate(args, args.checkpoint, Path(tmp))
        quality_study.write_study(samples, sampled, args, args.study_out, machine_description())
        print(args.study_out.read_text())
        return
    from ditq_compiler import CalibrationConfig

    labels = qr.select_rows(args.rows)
    calibration = CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples,
                                    guidance_scale=args.guidance_scale)
    with work_directory(args.work, "ditq-quality-") as work:
        rows, failed, loaded = qr.build_rows(args.checkpoint, work, labels, calibration)
        print(f"built {len(rows)} rows in {time.perf_counter() - start:.0f} s", flush=True)
        results, samples_by_row, per_timestep = evaluate(rows, loaded, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The plots are named after --out, so a second table (e.g. docs/quality_formats.md) keeps its own.
    plot_timestep_error(per_timestep, args.out.parent / f"{args.out.stem}_timestep_error.png", args.steps[0])
    plot_samples(samples_by_row, args.out.parent / f"{args.out.stem}_samples.png", args.steps[0])
    write_report(results, per_timestep, failed, args, args.out, time.perf_counter() - start)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
