"""Which distribution metric ranks the quality benchmark's rows: the study that writes docs/quality_metric.md.

    python bench/bench_quality.py --metric-study [--study-samples 500] [--study-cache /tmp/study.npz]

It samples FP32, ONNX Runtime's ``quantize_static`` (all ops, MatMul/Gemm) and ditq W8A8 minmax with the
same noise (seed ``s``), plus FP32 with seed ``s + 1`` (an independent reference) and FP32 without guidance,
then scores every candidate (feature space x FID / KID / KID per class x reference: the real digits or the
FP32 reference) against what PSNR vs FP32 ranks, with the noise measured over disjoint blocks of 100
samples. A candidate *passes* when every pair of rows it separates by more than twice its noise is in
PSNR's order, FP32 scores best within noise, and it separates both ``quantize_static`` rows from FP32.
"""

from __future__ import annotations

import datetime
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.stats import spearmanr

import quality_rows as qr
from evaluator import (class_kernel_distance, feature_space, features_and_logits, frechet_distance, jackknife_std,
                       kernel_distance, load_classifier, psnr, psnr_jackknife)

STUDY_ROWS = (qr.FP32, qr.QS_ALL, qr.QS_MATMUL, qr.BASE)
SHORT = {qr.FP32: "FP32", qr.QS_ALL: "qs all ops", qr.QS_MATMUL: "qs MatMul/Gemm", qr.BASE: "ditq minmax"}
REFERENCE = "FP32, other seed"
UNGUIDED = "FP32, guidance 1.0"
BLOCK = 100  # samples per block: classes 0-9 ten times each

SPACES = {"features (128-d)": "features", "logits (10-d)": "logits", "softmax (10-d)": "probabilities",
          "PCA-16 of features": "pca"}
# What the benchmark reports (bench_quality.py): KID per class in the 128-d features vs the FP32 reference.
BENCH_CANDIDATE = ("features (128-d)", "KID per class", REFERENCE)


def _fid(a, a_classes, b, b_classes) -> float:
    return frechet_distance(a, b)


def _kid(a, a_classes, b, b_classes) -> float:
    return kernel_distance(a, b)


def _kid_per_class(a, a_classes, b, b_classes) -> float:
    return class_kernel_distance(a, a_classes, b, b_classes)[0]


METRICS: dict[str, Callable] = {"FID": _fid, "KID": _kid, "KID per class": _kid_per_class}


def generate(args, checkpoint: Path, work: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The study's samples: each of :data:`STUDY_ROWS` (seed ``args.seed``), the FP32 reference (seed + 1)
    and FP32 without guidance. With ``args.study_cache``, sample sets already there with the same settings
    are read and the cache is rewritten after each new one (an interrupted study resumes). Returns the samples
    and, for those sampled in this run, the seconds each took."""
    from ditq_compiler import CalibrationConfig

    settings = np.array([args.study_samples, args.study_steps, args.guidance_scale, args.seed,
                         args.calib_steps, args.calib_samples], dtype=np.float64)
    cache = args.study_cache
    samples: dict[str, torch.Tensor] = {}
    if cache is not None and cache.exists():
        with np.load(cache) as data:
            if "settings" in data and np.array_equal(data["settings"], settings):
                samples = {str(name): torch.from_numpy(data[f"s{i}"]) for i, name in enumerate(data["names"])}
                print(f"study: read {', '.join(samples)} from {cache}", flush=True)
    jobs = {label: (label, args.guidance_scale, args.seed) for label in STUDY_ROWS}
    jobs[REFERENCE] = (qr.FP32, args.guidance_scale, args.seed + 1)
    jobs[UNGUIDED] = (qr.FP32, 1.0, args.seed)
    missing = [name for name in jobs if name not in samples]
    if missing:
        calibration = CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples,
                                        guidance_scale=args.guidance_scale)
        paths, failed, loaded = qr.build_rows(checkpoint, work,
                                              list(dict.fromkeys(jobs[name][0] for name in missing)), calibration)
        if failed:
            raise SystemExit(f"the study needs every row; did not compile: {failed}")
    seconds = {}
    for name in missing:
        label, guidance, seed = jobs[name]
        start = time.perf_counter()
        samples[name] = qr.sample_row(paths[label], loaded, args.study_samples, steps=args.study_steps,
                                      guidance_scale=guidance, seed=seed)
        seconds[name] = time.perf_counter() - start
        print(f"study: {name}: {args.study_samples} samples in {seconds[name]:.0f} s", flush=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, settings=settings, names=np.array(list(samples)),
                     **{f"s{i}": s.numpy() for i, s in enumerate(samples.values())})
    return {name: samples[name] for name in jobs}, seconds


@dataclass
class Candidate:
    space: str
    metric: str
    reference: str
    full: dict[str, float]            # row -> value over all samples
    blocks: dict[str, np.ndarray]     # row -> value per disjoint block of BLOCK samples
    spearman: float = 0.0
    spearman_blocks: float = 0.0
    sigma_block: float = 0.0          # std over blocks of the FP32 row's value
    resolved: int = 0
    agreeing: int = 0
    fp32_best: bool = False
    separates_peers: bool = False
    z_block: float = 0.0              # MatMul/Gemm row vs FP32 at BLOCK samples, in its paired noise
    calibrated: bool = False          # FP32 vs the reference within twice its noise of 0

    @property
    def passes(self) -> bool:
        return self.resolved == self.agreeing and self.fp32_best and self.separates_peers

    @property
    def name(self) -> tuple[str, str, str]:
        return (self.space, self.metric, self.reference)


def _spearman(values: list[float], psnrs: list[float]) -> float:
    """Spearman correlation of a distance (lower is better) with PSNR's order (higher is better): +1 when
    the distance ranks the rows exactly as PSNR does."""
    return float(spearmanr(values, [-p for p in psnrs])[0])


def score(candidate: Candidate, psnrs: dict[str, float]) -> Candidate:
    """Fill in the checks of ``candidate`` from its values."""
    rows = list(candidate.full)
    count = len(next(iter(candidate.blocks.values())))
    full, blocks = candidate.full, candidate.blocks
    candidate.spearman = _spearman([full[r] for r in rows], [psnrs[r] for r in rows])
    candidate.spearman_blocks = float(np.mean([_spearman([blocks[r][i] for r in rows], [psnrs[r] for r in rows])
                                               for i in range(count)]))
    candidate.sigma_block = float(np.std(blocks[qr.FP32], ddof=1))

    def sigma_diff(a, b):  # std of the paired difference at the full sample count
        return float(np.std(blocks[a] - blocks[b], ddof=1) / np.sqrt(count))

    candidate.resolved = candidate.agreeing = 0
    for a, b in itertools.combinations(rows, 2):
        diff = full[a] - full[b]
        if abs(diff) > 2 * sigma_diff(a, b):
            candidate.resolved += 1
            candidate.agreeing += int((diff < 0) == (psnrs[a] > psnrs[b]))
    others = [r for r in rows if r != qr.FP32]
    candidate.fp32_best = all(full[r] - full[qr.FP32] > -2 * sigma_diff(r, qr.FP32) for r in others)
    candidate.separates_peers = all(full[r] - full[qr.FP32] > 2 * sigma_diff(r, qr.FP32)
                                    for r in (qr.QS_ALL, qr.QS_MATMUL))
    candidate.calibrated = abs(full[qr.FP32]) <= 2 * candidate.sigma_block / np.sqrt(count)
    gap = blocks[qr.QS_MATMUL] - blocks[qr.FP32]
    candidate.z_block = float(gap.mean() / max(np.std(gap, ddof=1), 1e-300))
    return candidate


def evaluate_candidates(samples: dict[str, torch.Tensor], classifier, real, real_classes) -> list[Candidate]:
    count = samples[qr.FP32].shape[0] // BLOCK
    classes = np.arange(samples[qr.FP32].shape[0]) % 10
    block_classes = classes[:BLOCK]
    psnrs = {r: psnr(samples[r], samples[qr.FP32]) for r in STUDY_ROWS}
    candidates = []
    for space, kind in SPACES.items():
        embed = feature_space(kind, classifier, real)
        embedded = {name: embed(s) for name, s in samples.items()}
        references = {"real digits": (embed(real), np.asarray(real_classes)), REFERENCE: (embedded[REFERENCE], classes)}
        for (metric, fn), (ref_name, (ref, ref_classes)) in itertools.product(METRICS.items(), references.items()):
            full = {r: fn(embedded[r], classes, ref, ref_classes) for r in STUDY_ROWS}
            blocks = {r: np.array([fn(embedded[r][i * BLOCK:(i + 1) * BLOCK], block_classes, ref, ref_classes)
                                   for i in range(count)]) for r in STUDY_ROWS}
            candidates.append(score(Candidate(space, metric, ref_name, full, blocks), psnrs))
        print(f"study: scored {space}", flush=True)
    return candidates


def _fmt(value: float) -> str:
    if value == 0 or 1e-2 <= abs(value) < 1e5:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.2e}"


def write_study(samples: dict[str, torch.Tensor], sampled: dict[str, float], args, out: Path, machine: str) -> None:
    """Score the candidates on ``samples`` and write the study's report to ``out``."""
    from digits import load_digits_tensors

    start = time.perf_counter()
    root = Path(__file__).resolve().parents[1]
    classifier = load_classifier(root / "models" / "digits-classifier")
    real, real_classes = load_digits_tensors()
    candidates = evaluate_candidates(samples, classifier, real, real_classes)
    by_name = {c.name: c for c in candidates}
    n = samples[qr.FP32].shape[0]
    count = n // BLOCK
    fp = samples[qr.FP32]
    psnrs = {r: psnr(samples[r], fp) for r in STUDY_ROWS if r != qr.FP32}
    psnr_blocks = {r: [psnr(samples[r][i * BLOCK:(i + 1) * BLOCK], fp[i * BLOCK:(i + 1) * BLOCK]) for i in range(count)]
                   for r in psnrs}
    unrelated = psnr(samples[REFERENCE], fp)
    chosen = by_name[BENCH_CANDIDATE]
    plain = by_name[("features (128-d)", "KID", REFERENCE)]
    _, fp_logits = features_and_logits(classifier, samples[qr.FP32])
    confident = float((torch.softmax(fp_logits, 1).max(1).values > 0.99).float().mean())
    old = by_name[("features (128-d)", "FID", "real digits")]

    lines = [
        "# Choosing the quality benchmark's distribution metric",
        "",
        "Written by `python bench/bench_quality.py --metric-study`; every number below is computed by it from the "
        "study's samples"
        + (" (sampled in this run: " + ", ".join(f"{name} in {t:.0f} s" for name, t in sampled.items()) + ")"
           if sampled else "")
        + (f"; {', '.join(f'`{name}`' for name in samples if name not in sampled)} read from its `--study-cache`, "
           "written by an earlier run with the same settings" if len(sampled) < len(samples) else "") + ".",
        "",
        f"- Machine: {machine}; date {datetime.date.today().isoformat()}.",
        f"- Samples: {n} per row (classes 0-9 in turn), DDPM {args.study_steps} steps, guidance "
        f"{args.guidance_scale}, seed {args.seed}, the same noise for every row; `{REFERENCE}` is FP32 with seed "
        f"{args.seed + 1} (independent noise), `{UNGUIDED}` is FP32 sampled without guidance. Rows: "
        + "; ".join(f"{SHORT[r]} = {r}" for r in STUDY_ROWS) + ".",
        "- PSNR vs FP32 (same noise), which a metric should rank like: "
        + "; ".join(f"{SHORT[r]} {p:.2f} dB" for r, p in psnrs.items())
        + f"; two unrelated FP32 sample sets (seed {args.seed} vs {args.seed + 1}) are {unrelated:.2f} dB apart.",
        f"- Noise: each row's {n} samples form {count} disjoint blocks of {BLOCK} (classes balanced, the same "
        f"indices in every row). σ@{BLOCK}: the std of FP32's value over the blocks; a pair of rows is *resolved* "
        f"when their difference over all {n} samples exceeds twice the std of their paired block differences "
        f"/ √{count}. ρ: Spearman correlation with PSNR's order (+1: the same ranking) over all samples, and its "
        f"mean over the blocks (what a {BLOCK}-sample benchmark would see). z@{BLOCK}: the MatMul/Gemm row's "
        "mean block distance above FP32 over the std of that difference.",
        "- Passes: every resolved pair in PSNR's order, FP32 best within noise (no row lower by more than twice "
        "the noise), and both quantize_static rows resolved above FP32. FP32 ≈ 0: FP32's value within twice its "
        f"noise (σ@{BLOCK} / √{count}) of 0, i.e. the metric reads 0 for a model that samples as the reference "
        "does, whatever the sample count (FID never does: it is biased upwards).",
        "",
        "| space | metric | vs | " + " | ".join(SHORT[r] for r in STUDY_ROWS)
        + f" | ρ | ρ@{BLOCK} | σ@{BLOCK} | resolved pairs in PSNR order | FP32 best | z@{BLOCK} | passes "
        "| FP32 ≈ 0 |",
        "|---|---|---|" + "---:|" * (len(STUDY_ROWS) + 4) + "---|---:|---|---|",
    ]
    for c in candidates:
        lines.append(f"| {c.space} | {c.metric} | {c.reference} | "
                     + " | ".join(_fmt(c.full[r]) for r in STUDY_ROWS)
                     + f" | {c.spearman:+.2f} | {c.spearman_blocks:+.2f} | {_fmt(c.sigma_block)} | "
                     f"{c.agreeing}/{c.resolved} | {'yes' if c.fp32_best else 'no'} | {c.z_block:+.1f} | "
                     f"{'**yes**' if c.passes else 'no'} | {'yes' if c.calibrated else 'no'} |")

    # Why the real digits cannot be the reference: the distance to the data is mostly guidance's.
    embed = feature_space("features", classifier, real)
    real_features = embed(real)
    guided, unguided = embed(samples[qr.FP32]), embed(samples[UNGUIDED])
    fid_guided, fid_unguided = frechet_distance(guided, real_features), frechet_distance(unguided, real_features)
    vs_real = [c for c in candidates if c.reference == "real digits"]
    vs_fp32 = [c for c in candidates if c.reference == REFERENCE]
    closer = [r for r in STUDY_ROWS if r != qr.FP32 and old.full[r] < old.full[qr.FP32]]
    lines += [
        "",
        "## What the study found",
        "",
        f"- **Against the real digits.** {sum(c.passes for c in vs_real)} of {len(vs_real)} candidates pass; their "
        f"ρ ranges from {min(c.spearman for c in vs_real):+.2f} to {max(c.spearman for c in vs_real):+.2f} "
        "(-1: exactly backwards). The old metric (FID, 128-d features, vs real) scores FP32 "
        f"{old.full[qr.FP32]:.1f} and " + ", ".join(f"{SHORT[r]} {old.full[r]:.1f}" for r in STUDY_ROWS if r != qr.FP32)
        + (f"; {', '.join(SHORT[r] for r in closer)} closer to the real digits than FP32." if closer else ".")
        + f" FP32 without guidance scores {fid_unguided:.1f}, with guidance {args.guidance_scale} "
        f"{fid_guided:.1f}: the distance to the data is mostly how far guidance pulls the samples from it, and a "
        "quantized row can be nearer the data while further from what FP32 generates.",
        f"- **More samples.** FID is biased by the sample count: the old metric scores FP32 "
        f"{old.blocks[qr.FP32].mean():.1f} on blocks of {BLOCK} and {old.full[qr.FP32]:.1f} on all {n}; its ρ is "
        f"{old.spearman_blocks:+.2f} on blocks and {old.spearman:+.2f} on all samples.",
        "- **Lower-dimensional spaces**, against the FP32 reference, z@100 of KID per class: "
        + "; ".join(f"{space} {by_name[(space, 'KID per class', REFERENCE)].z_block:+.1f}" for space in SPACES)
        + f"; the softmax resolves {by_name[('softmax (10-d)', 'KID per class', REFERENCE)].resolved} pairs of "
        f"{len(STUDY_ROWS) * (len(STUDY_ROWS) - 1) // 2}: the classifier gives {confident:.1%} of the FP32 "
        "samples a probability above 0.99.",
        f"- **Against FP32's own samples** (another seed) {sum(c.passes for c in vs_fp32)} of {len(vs_fp32)} "
        f"candidates pass. Plain KID in the features scores FP32 vs its reference {plain.full[qr.FP32]:.1f} "
        f"(σ@100 {plain.sigma_block:.1f}, FP32 ≈ 0: {'yes' if plain.calibrated else 'no'}), KID per class "
        f"{chosen.full[qr.FP32]:.1f} (σ@100 {chosen.sigma_block:.1f}, FP32 ≈ 0: "
        f"{'yes' if chosen.calibrated else 'no'}). An unbiased estimate is 0 in expectation for one distribution, "
        "but the samples are drawn class by class in turn, not independently, which the plain estimator's "
        "within-set term does not account for; per class they are independent.",
    ]
    passing = [c for c in candidates if c.passes]
    eligible = [c for c in passing if c.calibrated]
    zs = sorted(c.z_block for c in passing)
    if eligible:
        best = max(eligible, key=lambda c: c.z_block)
        names = ", ".join(f"{c.metric} in the {c.space}" for c in eligible)
        lines.append(
            f"- **Chosen.** Passing candidates separate the MatMul/Gemm row by z@{BLOCK} from {zs[0]:+.1f} to "
            f"{zs[-1]:+.1f}; a z from {count} blocks is itself uncertain by about {1 / np.sqrt(2 * (count - 1)):.0%} "
            "(the relative error of a std from that many values), so the rule prefers the "
            f"candidates that also read ≈ 0 for FP32 ({names}), "
            f"and among those the largest z: {best.metric} in the {best.space} vs {best.reference} "
            f"(z@{BLOCK} {best.z_block:+.1f}, ρ {best.spearman:+.2f}, ρ@{BLOCK} {best.spearman_blocks:+.2f}). "
            f"The benchmark reports {chosen.metric} in the {chosen.space} vs {chosen.reference}"
            + (" (the same)." if best is chosen else
               f" (passes: {'yes' if chosen.passes else 'no'}, FP32 ≈ 0: {'yes' if chosen.calibrated else 'no'}, "
               f"z@{BLOCK} {chosen.z_block:+.1f}): this run chose differently."))
    elif passing:
        lines.append(f"- **Chosen.** No passing candidate reads ≈ 0 for FP32; the benchmark reports {chosen.metric} "
                     f"in the {chosen.space} vs {chosen.reference} (passes: {'yes' if chosen.passes else 'no'}).")
    else:
        lines.append("- **No candidate passes**: the benchmark should report PSNR only.")
    ditq_gap = chosen.full[qr.BASE] - chosen.full[qr.FP32]
    ditq_sigma = float(np.std(chosen.blocks[qr.BASE] - chosen.blocks[qr.FP32], ddof=1) / np.sqrt(count))
    lines.append(f"- **Resolution**: ditq W8A8 minmax is {ditq_gap:+.1f} above FP32 (paired noise {ditq_sigma:.1f} "
                 f"over {n} samples, PSNR {psnrs[qr.BASE]:.2f} dB): "
                 + ("the distribution metric cannot tell it from FP32 even at this sample count, so rows of about "
                    "that PSNR are told apart by PSNR vs FP32, not by KID." if abs(ditq_gap) <= 2 * ditq_sigma else
                    "the distribution metric tells it from FP32 at this sample count."))

    # The noise estimates the benchmark prints (jackknife) vs the spread observed over the blocks.
    lines += ["", f"## The benchmark's noise estimates at {BLOCK} samples", "",
              "The benchmark prints jackknife standard errors (leave one sample out), of each value and of the "
              "paired difference between two rows (its verdicts); here they are next to the std actually observed "
              f"over the {count} disjoint blocks of {BLOCK}.", "",
              "| row | KID per class vs FP32 (mean of blocks) | observed std | jackknife | minus FP32's: observed std "
              "| jackknife | PSNR (mean of blocks) | observed std | jackknife |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = embed(samples[REFERENCE])
    classes = np.arange(n) % 10

    def kid_blocks(row):
        embedded = embed(samples[row])
        return [class_kernel_distance(embedded[i * BLOCK:(i + 1) * BLOCK], classes[:BLOCK], ref, classes)
                for i in range(count)]

    fp_kid = kid_blocks(qr.FP32)
    for r in STUDY_ROWS:
        kid = fp_kid if r == qr.FP32 else kid_blocks(r)
        kid_jack = np.mean([jackknife_std(loo) for _, loo in kid])
        diff_cells = "— | —"
        if r != qr.FP32:
            diff_cells = (f"{np.std(chosen.blocks[r] - chosen.blocks[qr.FP32], ddof=1):.1f} | "
                          f"{np.mean([jackknife_std(loo - fp_loo) for (_, loo), (_, fp_loo) in zip(kid, fp_kid)]):.1f}")
        psnr_cells = "— | — | —"
        if r != qr.FP32:
            jack = [jackknife_std(psnr_jackknife(samples[r][i * BLOCK:(i + 1) * BLOCK],
                                                 fp[i * BLOCK:(i + 1) * BLOCK])[1]) for i in range(count)]
            psnr_cells = (f"{np.mean(psnr_blocks[r]):.2f} | {np.std(psnr_blocks[r], ddof=1):.2f} | "
                          f"{np.mean(jack):.2f}")
        lines.append(f"| {r} | {chosen.blocks[r].mean():.1f} | {np.std(chosen.blocks[r], ddof=1):.1f} | "
                     f"{kid_jack:.1f} | {diff_cells} | {psnr_cells} |")
    top = max(1, n // 100)

    def top_share(row):  # share of the squared error vs FP32 carried by the `top` worst samples
        errors = ((samples[row].clamp(-1, 1) - fp.clamp(-1, 1)) ** 2).flatten(1).mean(1).double()
        return float(errors.sort(descending=True).values[:top].sum() / errors.sum())

    lines += ["", "PSNR per block: " + "; ".join(f"{SHORT[r]} " + ", ".join(f"{p:.1f}" for p in ps)
                                                for r, ps in psnr_blocks.items())
              + f" dB. The {top} samples (1%) with the largest error carry "
              + ", ".join(f"{top_share(r):.0%} of {SHORT[r]}'s squared error" for r in psnrs)
              + f": where a few samples end far from FP32's, PSNR over {BLOCK} samples depends on whether a "
              "block holds one of them.",
              "", f"Scoring took {(time.perf_counter() - start):.0f} s.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
