"""Quality benchmark on the reference PixArt: writes the PixArt section of docs/quality.md and its plots.

Measured as the DiT rows are (``bench_quality.py``), through the model's own diffusers pipeline:

- Calibration: the pipeline runs once over ``--prompts`` (the model's caption prompts) and its transformer calls
  are recorded (``ditq record``); every ditq row compiles from that recording (``--calibration-inputs``) and
  ``quantize_static`` calibrates on the same calls.
- Rows: FP32 (ditq's ONNX export of the float transformer), ONNX Runtime's ``quantize_static`` W8A8 on it (all
  ops, and MatMul/Gemm only), and ditq rows named as in ``quality_rows.py`` (the same configurations as the DiT
  rows of the same label).
- Sampling: ``PixArtAlphaPipeline`` with each row as ``pipe.transformer`` (``OrtTransformer``), DPM-Solver++ (the
  pipeline's scheduler), the prompt "a handwritten <digit>" for digits 0-9 in turn, the same noise for every row,
  all in ONNX Runtime (CPU provider).
- Columns as the DiT table's: KID per class vs FP32 samples from another seed, class accuracy, PSNR and
  relative L2 vs FP32 from the same noise; a plot of each row's per-timestep denoiser error on the FP32
  trajectory's inputs.

    python bench/bench_quality_pixart.py                       # every row: ~12 minutes on 2 cores
    python bench/bench_quality_pixart.py --rows '*W8A8 minmax' --samples 50 --out /tmp/q.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
import bench_quality as bq  # noqa: E402
import quality_rows as qr  # noqa: E402
from common import (export_fp32, machine_description, quantize_static_baseline, work_directory,  # noqa: E402
                    write_marked_block)
from evaluator import features_and_logits, load_classifier, relative_l2  # noqa: E402

BLOCK = "pixart"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# the ditq rows, by their quality_rows label (the same configuration as the DiT row of that label): W8A8 with every
# recipe at 1 and 4 HTG groups (and minmax at 4 uniform ones), W4A8 with every recipe, FP8 and FP4 with the recipes
# the DiT table found best, at 4 HTG groups
PIXART_DITQ_ROWS = (
    *(qr.recipe_label(r) for r in qr.SMOOTHING_RECIPES),
    qr.recipe_label("minmax", 4, "uniform"),
    *(qr.recipe_label(r, 4, "htg") for r in qr.SMOOTHING_RECIPES),
    *(qr.format_label("w4a8", r) for r in qr.SMOOTHING_RECIPES),
    *(qr.format_label("fp8", r) for r in ("minmax", "ptq4dit", "vidit")),
    *(qr.format_label("fp4", r) for r in ("minmax", "vidit")),
)
ALL_ROWS = (qr.FP32, *qr.QUANTIZE_STATIC_ROWS, *PIXART_DITQ_ROWS)


def sample_prompts(count: int) -> list[str]:
    return [f"a handwritten {DIGIT_WORDS[i % 10]}" for i in range(count)]


def session_denoiser(path: Path, signature):
    """``denoise(inputs in signature order)`` running the ONNX model at ``path`` (the FP32 export or a
    ``quantize_static`` model) in ONNX Runtime on the CPU provider, 2 threads."""
    import onnxruntime as ort

    from ditq_compiler.runtime import quiet_session_options

    options = quiet_session_options()
    options.intra_op_num_threads = 2
    # ONNX Runtime's own session, as a user of the peer would open it: its own error where it refuses a model
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda inputs: torch.from_numpy(session.run([signature.output], signature.feeds(inputs))[0])


def artifact_denoiser(artifact):
    """``denoise(inputs in signature order)`` running a ditq artifact in ONNX Runtime on the CPU provider."""
    return lambda inputs: torch.from_numpy(artifact.denoise(*inputs, provider="cpu"))


def build_rows(pipeline: Path, work: Path, labels: list[str], args):
    """label -> ``denoise(inputs)`` for each row that could be built, label -> error line for the others, the
    loaded checkpoint, and the text embeddings' channel max/median over the calibration prompts."""
    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler import compile as compile_checkpoint
    from ditq_compiler.errors import DitqError
    from ditq_compiler.loading import load_checkpoint
    from ditq_compiler.prompts import load_prompts
    from ditq_compiler.recording import record_pipeline, text_outlier_ratio

    loaded = load_checkpoint(pipeline)
    signature = loaded.family.signature(loaded.model_config)
    recording = record_pipeline(pipeline, loaded.family, loaded.model_config, prompts=load_prompts(args.prompts),
                                steps=args.calib_steps, guidance_scale=args.guidance_scale, seed=args.seed,
                                batch_size=args.calib_samples, transformer=loaded.model)
    outlier_ratio = text_outlier_ratio(recording, signature.spec("text").name)
    calls = recording.save(work / "calibration.safetensors")
    print(f"recorded {len(recording)} calibration calls (text channel max/median {outlier_ratio:.1f})", flush=True)
    fp32 = work / "fp32.onnx"
    export_fp32(loaded.model, fp32, loaded.family, recording.check_inputs())
    denoisers, failed = {qr.FP32: session_denoiser(fp32, signature)}, {}
    batches = [signature.feeds(inputs) for _, inputs in recording]
    calibration = CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples,
                                    guidance_scale=args.guidance_scale, seed=args.seed, inputs=str(calls))
    for index, label in enumerate(labels):
        start = time.perf_counter()
        if label in qr.QUANTIZE_STATIC_ROWS:
            path = work / f"qs-{index}.onnx"
            try:
                quantize_static_baseline(fp32, path, batches, matmul_only=qr.QUANTIZE_STATIC_ROWS[label])
                denoisers[label] = session_denoiser(path, signature)
            except Exception as exc:  # the peer's own failure is a result: reported, the other rows still run
                failed[label] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                print(f"{label}: failed: {failed[label]}", flush=True)
                continue
        elif label in qr.DITQ_ROWS:
            directory = qr.row_directory(work, label)
            try:
                artifact = compile_checkpoint(pipeline, directory,
                                              CompileConfig(calibration=calibration, **qr.DITQ_ROWS[label]),
                                              force=directory.exists())
            except DitqError as exc:
                failed[label] = str(exc)
                print(f"{label}: did not compile: {exc}", flush=True)
                continue
            denoisers[label] = artifact_denoiser(artifact)
        if label != qr.FP32:
            print(f"{label}: built in {time.perf_counter() - start:.0f} s", flush=True)
    return denoisers, failed, loaded, outlier_ratio


def generate(pipe, transformer, prompts: list[str], *, steps: int, guidance_scale: float, seed: int,
             call_kwargs: dict) -> torch.Tensor:
    """Samples ``[N, 1, 16, 16]`` in [-1, 1]: the pipeline's latents (the reference PixArt works in pixels)."""
    pipe.transformer = transformer
    with torch.no_grad():
        images = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=torch.Generator().manual_seed(seed), **call_kwargs).images
    return torch.as_tensor(images).float()


def evaluate(denoisers: dict, loaded, args):
    from ditq_compiler.ort_transformer import OrtTransformer
    from ditq_compiler.recording import load_user_pipeline

    family, config = loaded.family, loaded.model_config
    signature = family.signature(config)

    def transformer(denoise):  # pipe.transformer running a row
        return OrtTransformer(denoise, family, signature, config)

    classifier = load_classifier(ROOT / "models" / "digits-classifier")
    pipe = load_user_pipeline(args.pipeline, transformer=None)
    prompts = sample_prompts(args.samples)
    classes = np.array([i % 10 for i in range(args.samples)])
    sample = dict(steps=args.steps, guidance_scale=args.guidance_scale,
                  call_kwargs=family.pipeline_call_kwargs(config))
    reference = generate(pipe, transformer(denoisers[qr.FP32]), prompts, seed=args.seed + 1, **sample)
    reference_features, _ = features_and_logits(classifier, reference)
    results, samples_by_row, fp_samples = {}, {}, None
    for label, denoise in denoisers.items():
        start = time.perf_counter()
        samples = generate(pipe, transformer(denoise), prompts, seed=args.seed, **sample)
        if label == qr.FP32:
            fp_samples = samples
        result = bq.score_row(samples, fp_samples, classes, classifier, reference_features,
                              time.perf_counter() - start)
        results[(label, args.steps)] = result
        samples_by_row[(label, args.steps)] = samples
        print(f"{label:<42} KID {result.kid:9.1f}  acc {result.accuracy:.3f}  PSNR {result.psnr:6.2f}  "
              f"({result.seconds:.0f} s)", flush=True)

    # Per-timestep denoiser error on the FP32 trajectory's inputs (teacher forcing), its first prompts.
    calls, fp = [], denoisers[qr.FP32]
    generate(pipe, transformer(lambda inputs: (calls.append(inputs), fp(inputs))[1]),
             prompts[:args.trajectory_samples], seed=args.seed, **sample)
    fp_outputs = [fp(inputs) for inputs in calls]
    at = signature.index("timestep")
    per_timestep = {label: [(int(inputs[at][0]), relative_l2(denoise(inputs), reference_out))
                            for inputs, reference_out in zip(calls, fp_outputs)]
                    for label, denoise in denoisers.items() if label != qr.FP32}
    return results, samples_by_row, per_timestep


def write_report(results, per_timestep, failed, outlier_ratio: float, args, seconds: float) -> None:
    config = json.loads((args.pipeline / "training_config.json").read_text()) \
        if (args.pipeline / "training_config.json").is_file() else {}
    text = config.get("text_encoder", {})
    stem = f"{args.out.stem}_pixart"
    lines = [
        "## The reference PixArt",
        "",
        "Written by `python bench/bench_quality_pixart.py` (this section only; every number in it comes from one "
        "run of it).",
        "",
        f"- Machine: {machine_description()}; date {datetime.date.today().isoformat()}; "
        f"the run took {seconds / 60:.1f} minutes.",
        f"- Model: `{args.pipeline.relative_to(ROOT) if args.pipeline.is_relative_to(ROOT) else args.pipeline}` "
        "(PixArt-α layout: adaLN-single, cross-attention to a frozen tiny T5 encoder"
        + (f" of width {text['d_model']} whose hidden states carry constructed channel outliers" if text else "")
        + ", learned sigma, trained on scikit-learn's digits at 16x16; see [reference_model.md](reference_model.md)).",
        f"- Sampling: the model's `PixArtAlphaPipeline` with each row as `pipe.transformer`, DPM-Solver++ "
        f"{args.steps} steps, guidance {args.guidance_scale}, {args.samples} prompts \"a handwritten <digit>\" "
        f"(0-9 in turn), seed {args.seed}; the same noise for every row. All rows run in ONNX Runtime (CPU "
        "provider).",
        f"- Calibration, ditq and `quantize_static` alike: the pipeline's transformer calls over the "
        f"{args.prompts.name} prompts ({args.calib_samples} prompts per batch with the empty prompt, "
        f"{args.calib_steps} steps, guidance {args.guidance_scale}), recorded once. The recorded text embeddings' "
        f"channel max/median (of each channel's largest absolute value over the real tokens): {outlier_ratio:.1f}.",
        f"- KID vs FP32 (class-conditional, {args.samples} FP32 samples from seed {args.seed + 1}), class accuracy, "
        "PSNR and relative L2 vs FP32 from the same noise: as in the DiT table above.",
        "",
    ]
    lines += bq.table_lines(results, failed)
    lines += ["", f"![per-timestep error, PixArt]({stem}_timestep_error.png)", "",
              f"![samples, PixArt]({stem}_samples.png)", ""]
    findings = bq.findings(results, per_timestep, argparse.Namespace(steps=[args.steps]))
    lines += [("### " + line[3:]) if line.startswith("## ") else line for line in findings]
    write_marked_block(args.out, BLOCK, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=ROOT / "models" / "pixart-digits")
    parser.add_argument("--prompts", type=Path, help="calibration prompts (default: the pipeline's prompts.txt)")
    parser.add_argument("--rows", nargs="+", metavar="PATTERN",
                        help="rows whose label contains PATTERN (or matches it as a glob), case-insensitive; FP32 is "
                             "always kept. Rows: " + "; ".join(ALL_ROWS))
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--trajectory-samples", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    parser.add_argument("--work", type=Path, help="keep the built models here (default: a temporary directory)")
    args = parser.parse_args()
    args.pipeline = args.pipeline.resolve()
    args.prompts = args.prompts or args.pipeline / "prompts.txt"
    if args.samples < 30 or args.samples % 10:
        parser.error("--samples must be a multiple of 10, at least 30 (KID per class needs 3 samples per class)")
    if args.rows:
        for pattern in args.rows:
            if not any(qr.matches(label, pattern) for label in ALL_ROWS):
                parser.error(f"--rows {pattern!r} matches no row; rows are: " + "; ".join(ALL_ROWS))
    labels = [label for label in ALL_ROWS
              if label == qr.FP32 or not args.rows or any(qr.matches(label, p) for p in args.rows)]
    torch.set_num_threads(2)
    start = time.perf_counter()
    with work_directory(args.work, "ditq-quality-pixart-") as work:
        denoisers, failed, loaded, outlier_ratio = build_rows(args.pipeline, work, labels, args)
        print(f"built {len(denoisers)} rows in {time.perf_counter() - start:.0f} s", flush=True)
        results, samples_by_row, per_timestep = evaluate(denoisers, loaded, args)
    stem = f"{args.out.stem}_pixart"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bq.plot_timestep_error(per_timestep, args.out.parent / f"{stem}_timestep_error.png", args.steps, "DPM-Solver++")
    bq.plot_samples(samples_by_row, args.out.parent / f"{stem}_samples.png", args.steps, sampler="DPM-Solver++")
    write_report(results, per_timestep, failed, outlier_ratio, args, time.perf_counter() - start)
    print(args.out.read_text().split("<!-- pixart:begin -->")[-1])


if __name__ == "__main__":
    main()
