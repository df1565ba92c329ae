"""Speed, size and memory benchmark: writes docs/benchmarks.md.

For random-weight DiT shapes (S/2, B/2, XL/2 of the DiT paper; 32x32x4 latents, patch 2, 256 tokens), in one
run: compile time and peak host memory of ditq (a child process each), artifact size, ONNX Runtime CPU latency
at each batch size of the FP32 export, the ditq W8A8 artifact and ONNX Runtime's own ``quantize_static`` on the
same FP32 export calibrated on the same trajectories (uint8 and int8 activations, MatMul/Gemm only and all
ops), the output error of each against FP32 on held-out denoiser inputs from several timesteps, ONNX
Runtime's per-op profile of the W8A8 artifact, and (on that model) each change of issue 11 taken back on its
own (``bench/ablation.py``). A run rewrites the sections of the models it measured and keeps the others.

    python bench/bench_speed.py                       # S and B, batches 2 and 8 (profile and ablation on B)
    python bench/bench_speed.py --models XL           # DiT-XL/2 at batches 2 and 8: slow, external data
    python bench/bench_speed.py --models S B XL       # all three in one run
    python bench/bench_speed.py --compare-profile OLD.onnx NEW.onnx   # per-op profile of two models
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import gelu_kernels, perturb_shared_embedders, strip_branch_value_info, unfold_biases, unfuse_attention  # noqa: E402
from common import (OUTSIDE_PHASES, PROFILE_CATEGORIES, PhaseMemorySampler, close_sessions, export_fp32, file_size_mb, latencies_ms,  # noqa: E402
                    machine_description, MARKER, marked_blocks, profile_by_op, peak_rss_bytes, quantize_static_baseline, relative_l2, run_child,
                    run_command, run_output, trajectory_batches, work_directory)

SHAPES = {  # DiT paper sizes: heads, head width (hidden = heads x width), depth
    "S": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12),
    "B": dict(num_attention_heads=12, attention_head_dim=64, num_layers=12),
    "XL": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28),
}
# ditq's default (float attention) and its fastest form, integer attention (--quantize-attention): opt-in because
# it costs PSNR on the reference model (docs/quality.md). The variants below (groups, embedders, the ablation)
# are taken from the integer-attention artifact.
FP32, DEFAULT = "FP32 export", "ditq W8A8 minmax (the defaults: float attention)"
DITQ, GROUPS4 = "ditq W8A8 minmax, integer attention", "ditq W8A8 minmax, integer attention, 4 timestep groups"
EMBEDDERS = "ditq W8A8 minmax, integer attention, embedders and final layer too"
PEERS = {  # row -> (activations, MatMul/Gemm only)
    "quantize_static uint8 act., MatMul/Gemm": ("uint8", True),
    "quantize_static uint8 act., all ops": ("uint8", False),
    "quantize_static int8 act., MatMul/Gemm": ("int8", True),
    "quantize_static int8 act., all ops": ("int8", False),
}
FAIR_PEER = "quantize_static uint8 act., MatMul/Gemm"  # the form ONNX Runtime's x86 int8 kernels take
# Each change of issue 11 taken back on its own (bench/ablation.py): row -> (what it measures, the row it is
# compared with)
NO_INT_ATTENTION = "integer attention off (the default, --no-quantize-attention)"
NO_MHA = "the default with its float attention unfused (MatMul, Softmax, MatMul)"
NO_BIAS_FOLD = "bias fold taken back"
NO_DEDUP = "no identical embedders to merge (each block's moved by 1 ulp)"
NO_BRANCH_SHAPES = "4 timestep groups, branches without value_info"
ABLATION = {
    NO_INT_ATTENTION: ("integer attention (QK^T, PV on integer kernels)", DITQ),
    NO_MHA: ("float attention as com.microsoft.MultiHeadAttention (the default's)", NO_INT_ATTENTION),
    NO_BIAS_FOLD: ("bias folded into MatMulIntegerToFloat", DITQ),
    NO_DEDUP: ("DeduplicateSubgraphs (one embedder computed once)", DITQ),
    NO_BRANCH_SHAPES: ("GELU fused with its bias inside If branches (branch value_info)", GROUPS4),
}
MEMORY_GOAL = 2.5  # peak host memory of a compile, in FP32 model sizes (issue 11)


def random_dit(size: str, seed: int = 0):
    """A random-weight diffusers DiT of the paper's shape whose blocks share block 0's timestep/class embedder,
    as every DiT checkpoint converted from the original does (``convert_original_dit_state_dict``)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**SHAPES[size], in_channels=4, out_channels=8, sample_size=32, patch_size=2,
                                  num_embeds_ada_norm=1000).eval()
    with torch.no_grad():  # adaLN-zero starts at zero; random weights everywhere, as a trained model has
        for parameter in model.parameters():
            if parameter.dim() == 2 and parameter.abs().sum() == 0:
                parameter.normal_(0, 0.02)
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ------------------------------------------------------------------------------------------------
# Compiles run in a child process: wall time and peak resident memory of that process alone
# ------------------------------------------------------------------------------------------------

def compile_child(checkpoint: str, output: str, report: str, steps: int, samples: int, groups: int,
                  options: dict) -> None:
    """Runs in the child: compile, and write its seconds and per-phase peak memory to ``report``. ``options``:
    further ``CompileConfig`` fields (``quantize_attention``)."""
    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler import compile as compile_checkpoint
    from ditq_compiler.progress import _ACTIVITY  # read only: the name of the phase running now

    config = CompileConfig(calibration=CalibrationConfig(steps=steps, samples=samples), groups=groups,
                           grouping="uniform", **options)
    start = time.perf_counter()
    with PhaseMemorySampler(lambda: _ACTIVITY.name) as sampler:
        artifact = compile_checkpoint(checkpoint, output, config, force=True)
    Path(report).write_text(json.dumps({"seconds": time.perf_counter() - start, "phases": sampler.report(),
                                        "compile_seconds": artifact.compile_log["compile_seconds"],
                                        "peak_bytes": peak_rss_bytes()}))


def compile_in_child(checkpoint: Path, output: Path, args, groups: int = 1, **options) -> dict:
    options = {"quantize_attention": True, **options}  # see DITQ
    report = output.with_suffix(".compile.json")
    code, seconds = run_child([__file__, "--compile-child", str(checkpoint), str(output), str(report),
                                     str(args.calib_steps), str(args.calib_samples), str(groups),
                                     json.dumps(options)])
    if code != 0:
        raise SystemExit(f"compiling {checkpoint} failed (exit {code})")
    return {**json.loads(report.read_text()), "process_seconds": seconds}


# ------------------------------------------------------------------------------------------------
# One model
# ------------------------------------------------------------------------------------------------

def eval_inputs(model, scheduler_config: dict, args) -> tuple[list[int], list[dict]]:
    """Held-out denoiser inputs: a trajectory with other noise and labels than calibration's, taken at
    ``args.eval_points`` timesteps spread from the first step to the last."""
    batches = trajectory_batches(model, scheduler_config, steps=args.calib_steps, samples=args.calib_samples,
                                 guidance_scale=4.0, seed=1000 + args.seed)
    picks = sorted({round(i * (len(batches) - 1) / max(args.eval_points - 1, 1)) for i in range(args.eval_points)})
    chosen = [batches[i] for i in picks]
    return [int(b["timestep"][0]) for b in chosen], chosen


def latency_feeds(batch: int, seed: int = 123) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn((batch, 4, 32, 32), generator=generator).numpy(),
            "timestep": np.full(batch, 500, dtype=np.int64),
            "class_labels": (np.arange(batch, dtype=np.int64) * 137) % 1001}


def bench_model(size: str, work: Path, args) -> dict:
    from ditq_compiler import Artifact
    from ditq_compiler.cpu import u8s8_saturates
    from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG

    print(f"== DiT-{size}/2", file=sys.stderr)
    model = random_dit(size, args.seed)
    fp32_bytes = model_bytes(model)
    checkpoint = work / f"dit-{size}"
    model.save_pretrained(checkpoint, safe_serialization=True)

    compiles = {DEFAULT: compile_in_child(checkpoint, work / f"dit-{size}-w8a8-noattn", args, quantize_attention=False),
                DITQ: compile_in_child(checkpoint, work / f"dit-{size}-w8a8", args)}
    artifact = Artifact.load(work / f"dit-{size}-w8a8")
    paths = {FP32: work / f"dit-{size}-fp32.onnx", DEFAULT: Artifact.load(work / f"dit-{size}-w8a8-noattn").model_path,
             DITQ: artifact.model_path}
    if size != "XL" and not args.skip_groups:
        compiles[GROUPS4] = compile_in_child(checkpoint, work / f"dit-{size}-w8a8-g4", args, groups=4)
        paths[GROUPS4] = Artifact.load(work / f"dit-{size}-w8a8-g4").model_path
    if size != "XL" and not args.skip_embedders:
        compiles[EMBEDDERS] = compile_in_child(checkpoint, work / f"dit-{size}-w8a8-emb", args,
                                               quantize_embedders=True)
        paths[EMBEDDERS] = Artifact.load(work / f"dit-{size}-w8a8-emb").model_path
    ablation_paths = build_ablation(model, size, work, artifact, paths, args) \
        if size == args.profile_model and not args.skip_ablation else {}

    start = time.perf_counter()
    export_fp32(model, paths[FP32])
    seconds = {FP32: time.perf_counter() - start, **{name: c["seconds"] for name, c in compiles.items()}}

    calibration = trajectory_batches(model, DEFAULT_SCHEDULER_CONFIG, steps=args.calib_steps,
                                     samples=args.calib_samples, guidance_scale=4.0, seed=args.seed)
    reduce_range = u8s8_saturates()
    if not args.skip_peers:
        for name, (activations, matmul_only) in PEERS.items():
            paths[name] = work / f"dit-{size}-qs-{activations}-{'mm' if matmul_only else 'all'}.onnx"
            start = time.perf_counter()
            quantize_static_baseline(paths[FP32], paths[name], calibration, matmul_only=matmul_only,
                                     activations=activations, reduce_range=reduce_range and activations == "uint8")
            seconds[name] = seconds[FP32] + time.perf_counter() - start
    del calibration

    timesteps, evals = eval_inputs(model, DEFAULT_SCHEDULER_CONFIG, args)
    del model
    reference = [run_output(paths[FP32], b) for b in evals]
    errors = {name: [relative_l2(run_output(path, b), ref) for b, ref in zip(evals, reference)]
              for name, path in paths.items() if name != GROUPS4}
    close_sessions()  # the error sessions' memory, before timing

    runs = args.runs if size != "XL" else min(args.runs, args.xl_runs)
    latency = {batch: latencies_ms(paths, latency_feeds(batch), threads=args.threads, rounds=runs)
               for batch in args.batches}
    profile = None
    if size == args.profile_model:
        feeds = latency_feeds(args.profile_batch)
        profile = {name: profile_by_op(paths[name], feeds, threads=args.threads, runs=args.profile_runs,
                                       work_dir=work) for name in (DEFAULT, DITQ, FP32)}
    ablation = measure_ablation(ablation_paths, paths, evals, reference, args) if ablation_paths else None
    gelu = {name: gelu_kernels(paths[name]) for name in (DITQ, GROUPS4) if name in paths}
    return {
        "size": size, "config": SHAPES[size], "fp32_bytes": fp32_bytes, "seconds": seconds,
        "sizes": {name: file_size_mb(path) for name, path in paths.items()},
        "latency": latency, "errors": errors, "timesteps": timesteps, "runs": runs,
        "compiles": compiles, "reduce_range": reduce_range, "profile": profile, "ablation": ablation, "gelu": gelu,
        "kernels": artifact.manifest["fusion"]["kernels"], "layers": len(artifact.manifest["quantized_layers"]),
        "passes": {p["name"]: p["summary"] for p in artifact.manifest["passes"]},
        "lowering": {p["name"]: p["summary"] for p in artifact.manifest["lowering"]["passes"] if p["modified"]},
    }


def build_ablation(model, size: str, work: Path, artifact, paths: dict, args) -> dict[str, Path]:
    """The variants of :data:`ABLATION`: each change of issue 11 taken back on its own (``bench/ablation.py``)."""
    import copy

    import onnx

    from ditq_compiler import Artifact

    variants: dict[str, Path] = {NO_INT_ATTENTION: paths[DEFAULT]}  # the default artifact, compiled above

    variants[NO_MHA] = work / f"dit-{size}-unfused-attention.onnx"
    onnx.save(unfuse_attention(Artifact.load(paths[DEFAULT].parent)), variants[NO_MHA])

    variants[NO_BIAS_FOLD] = work / f"dit-{size}-nofold.onnx"
    onnx.save(unfold_biases(artifact), variants[NO_BIAS_FOLD])

    perturbed = copy.deepcopy(model)
    perturb_shared_embedders(perturbed)
    perturbed.save_pretrained(work / f"dit-{size}-distinct", safe_serialization=True)
    del perturbed
    compile_in_child(work / f"dit-{size}-distinct", work / f"dit-{size}-w8a8-distinct", args)
    variants[NO_DEDUP] = Artifact.load(work / f"dit-{size}-w8a8-distinct").model_path

    if GROUPS4 in paths:
        stripped, _ = strip_branch_value_info(onnx.load(paths[GROUPS4]))
        variants[NO_BRANCH_SHAPES] = work / f"dit-{size}-g4-noshapes.onnx"
        onnx.save(stripped, variants[NO_BRANCH_SHAPES])
    return variants


def measure_ablation(variants: dict[str, Path], paths: dict, evals: list, reference: list, args) -> dict:
    """Latency of every variant and of the rows they are compared with, in the same interleaved rounds at the
    profile batch; the output error of each on the held-out inputs; GELU kernels and dedup summaries."""
    import json as _json

    models = {name: paths[name] for name in (DITQ, GROUPS4) if name in paths} | variants
    errors = {name: max(relative_l2(run_output(path, b), ref) for b, ref in zip(evals, reference))
              for name, path in models.items()}
    close_sessions()
    latency = latencies_ms(models, latency_feeds(args.profile_batch), threads=args.threads, rounds=args.runs)
    dedup = {}
    for name in (DITQ, NO_DEDUP):
        manifest = _json.loads((models[name].parent / "manifest.json").read_text())
        dedup[name] = next(p["summary"] for p in manifest["passes"] if p["name"] == "dedup_subgraphs")
    gelu = {name: gelu_kernels(models[name]) for name in (GROUPS4, NO_BRANCH_SHAPES) if name in models}
    return {"latency": latency, "errors": errors, "dedup": dedup, "gelu": gelu,
            "sizes": {name: file_size_mb(path) for name, path in models.items()}}


def ablation_lines(ablation: dict, batch: int) -> list[str]:
    latency, errors = ablation["latency"], ablation["errors"]
    lines = [f"### Each change on its own (batch {batch})", "",
             "Every variant takes back one change (how: `bench/ablation.py`) and is timed in the same interleaved "
             "rounds as the artifact it is compared with. Ratio = variant / with the change: above 1 the change "
             "makes the model faster.", "",
             "| change | variant (change taken back) | variant ms | with the change ms | ratio | variant rel. L2 error |",
             "|---|---|---:|---:|---:|---:|"]
    for name, (change, base) in ABLATION.items():
        if name not in latency:
            continue
        lines.append(f"| {change} | {name} | {latency[name]:.1f} | {latency[base]:.1f} | "
                     f"{latency[name] / latency[base]:.2f}x | {errors[name]:.2%} |")
    lines += ["", f"Output error of the artifacts compared with: {DITQ} {errors[DITQ]:.2%}"
              + (f", {GROUPS4} {errors[GROUPS4]:.2%}" if GROUPS4 in errors else "") + ".", ""]
    lines += ["ONNX Runtime's fused attention (`com.microsoft.MultiHeadAttention`) is what the default runs: the CPU "
              "lowering fuses its float attention (`exporters/lowering/attention.py`). Its row takes the fusion back "
              "with the fusion's own inverse, which splits the heads with constant-shape Reshapes; that form is "
              "leaner than the exporter's attention (no per-block shape arithmetic, and ONNX Runtime runs its "
              "QK^T as one FusedMatMul), so the row compares MultiHeadAttention with that leaner form, not with "
              "the attention the default ran before the fusion. Integer attention is left unfused (its products "
              "run on integer kernels).",
              "", f"Deduplication: {ablation['dedup'][DITQ]} (the variant: {ablation['dedup'][NO_DEDUP]}).", ""]
    if ablation["gelu"]:
        lines += ["GELU in ONNX Runtime's optimized graph (every branch counted): " + "; ".join(
            f"{name}: {c['with bias']} with the bias inside, {c['without bias']} after a separate bias Add"
            for name, c in ablation["gelu"].items()) + ".", ""]
    return lines


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def profile_table(profiles: dict[str, dict]) -> list[str]:
    names = list(profiles)
    lines = ["| op type (ONNX Runtime's optimized graph) | " + " | ".join(f"{n} ms (nodes)" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for category in [name for name, _ in PROFILE_CATEGORIES] + ["others"]:
        cells = [f"{profiles[n]['categories'][category]:.1f} ({profiles[n]['nodes'][category]})" for n in names]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    lines.append("| **sum of kernels** | " + " | ".join(f"**{profiles[n]['kernel_total_ms']:.1f}**" for n in names)
                 + " |")
    lines.append("| wall time of a run | " + " | ".join(f"{profiles[n]['wall_ms']:.1f}" for n in names) + " |")
    return lines


def goal_lines(result: dict, batch: int) -> list[str]:
    """The goal's three figures for each ditq row (the default and integer attention), then the peers'."""
    latency = result["latency"][batch]
    error = {name: max(values) for name, values in result["errors"].items()}
    lines = []
    for name in (DEFAULT, DITQ):
        ours = latency[name]
        line = (f"- {name}: **{latency[FP32] / ours:.2f}x** the FP32 export (goal 4.5x)"
                + (f", **{latency[FAIR_PEER] / ours:.2f}x** the fair peer (goal 1.8x)" if FAIR_PEER in latency else "")
                + f", relative output error {error[name]:.2%} (goal at most 1%).")
        lines.append(line)
    if FAIR_PEER in latency:
        lines.append(f"- The fair peer ({FAIR_PEER}): relative output error {error[FAIR_PEER]:.2%}.")
        usable = {n: latency[n] for n in PEERS if n in latency and error[n] <= 0.01}
        if usable:
            best = min(usable, key=usable.get)
            lines.append(f"- Fastest peer row within 1% error: {best} ({usable[best]:.1f} ms); the ditq default is "
                         f"{usable[best] / latency[DEFAULT]:.2f}x faster.")
        else:
            lines.append("- No quantize_static row stays within 1% error here.")
    return lines


SECTION = "## DiT-"


def write_report(results: list[dict], args, path: Path) -> None:
    """Write the sections of this run's models into ``path``, keeping the sections of other models that an
    earlier run wrote there (``--models XL`` adds DiT-XL/2 beside S/2 and B/2); each section names its run."""
    batches = args.batches
    lines = [
        "# Benchmarks",
        "",
        "Written by `python bench/bench_speed.py`; each model's section comes from one run of it, named at its top "
        "with the machine, the date and the settings of that run.",
        "",
        "- Models: random-weight diffusers `DiTTransformer2DModel` with the DiT paper's shapes, 32x32x4 latents, "
        "patch 2 (256 tokens), 1000 classes; every block holds block 0's timestep/class embedder, as checkpoints "
        "converted from the original DiT do. ONNX Runtime CPU provider; every model of a table is timed in the "
        "same interleaved rounds (one run of each per round, after 3 warm-up runs each) and the median is reported. "
        "The machine may be shared with other jobs during a run: absolute times move by up to 2x between runs; the "
        "ratios within one table (interleaved rounds) are what to compare.",
        "- Calibration (ditq and every `quantize_static` row): the same trajectories (samples x DDPM steps with "
        "guidance 4.0, each sample in one batch with its null-class twin).",
        "- Error: relative L2 of the output vs the FP32 export on held-out denoiser inputs (a trajectory with other "
        "noise and labels than calibration) at several timesteps from the first step to the last; the table shows "
        "the largest, the per-timestep values follow it.",
        "- `quantize_static` rows: ONNX Runtime's quantizer on the same FP32 export (QDQ, per-channel int8 weights, "
        "min/max calibration), on MatMul/Gemm only or on all ops. uint8 activations are what ONNX Runtime's x86 "
        "int8 GEMMs take; with them q, k and v share one quantized input and fuse, so the uint8 MatMul/Gemm row is "
        "the fair peer. int8 activations are converted by ONNX Runtime itself and leave q/k/v unfused; those rows "
        "are kept for comparison. Their compile time includes the FP32 export.",
        "- Random weights have none of a trained DiT's activation outliers, so the errors here understate what "
        "quantization costs; quality on a trained model is measured in [quality.md](quality.md).",
        "- CUDA provider: not measured here (see the GPU benchmark for the CUDA and TensorRT targets).",
        "",
    ]
    command = run_command("bench/bench_speed.py", sys.argv[1:])
    sections = _old_sections(path) if path.exists() else {}
    for result in results:
        size, latency = result["size"], result["latency"]
        reduce = result["reduce_range"]
        section_start = len(lines)
        lines += [f"{SECTION}{size}/2", "",
                  f"Run: `{command.strip()}` on {datetime.date.today().isoformat()}; {machine_description()}; "
                  f"{args.threads} intra-op threads; calibration {args.calib_samples} samples x {args.calib_steps} "
                  f"steps; error at {args.eval_points} held-out timesteps; {result['runs']} timing rounds.", ""]
        if reduce:
            lines += ["This CPU's u8 x s8 GEMMs saturate full-range int8 weights (no VNNI), so the uint8 "
                      "`quantize_static` rows use 7-bit weights (`reduce_range=True`, ONNX Runtime's advice for such "
                      "CPUs), as ditq does by default; the int8-activation rows keep full-range weights.", ""]
        header = "| artifact | compile s | size MB | " + " | ".join(
            f"batch {b} ms | speed-up b{b}" for b in batches) + " | rel. L2 error vs FP32 (max) |"
        lines += [header, "|---|" + "---:|" * (3 + 2 * len(batches))]
        for name in [FP32, DEFAULT, DITQ, *[n for n in (EMBEDDERS,) if n in result["errors"]],
                     *[p for p in PEERS if p in result["errors"]]]:
            cells = [f"{result['seconds'][name]:.1f}", f"{result['sizes'][name]:.1f}"]
            for b in batches:
                cells += [f"{latency[b][name]:.1f}", f"{latency[b][FP32] / latency[b][name]:.2f}x"]
            label = f"{name} (the fair peer)" if name == FAIR_PEER else name
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {max(result['errors'][name]):.2%} |")
        lines += ["", "Error per timestep (t = " + ", ".join(map(str, result["timesteps"])) + "): " + "; ".join(
            f"{name} " + " / ".join(f"{e:.2%}" for e in values) for name, values in result["errors"].items()
            if name != FP32) + ".", ""]
        lines += [f"ditq: {result['layers']} quantized layers, ONNX Runtime kernels {result['kernels']}. Passes: "
                  f"{result['passes'].get('dedup_subgraphs', '')}; lowering: "
                  + "; ".join(result["lowering"].values()) + ".", ""]
        if result["gelu"]:
            lines += ["GELU in ONNX Runtime's optimized graph (every `If` branch counted): " + "; ".join(
                f"{name}: {c['with bias']} with the bias inside (FastGelu/BiasGelu), {c['without bias']} after a "
                "separate bias Add" for name, c in result["gelu"].items()) + ".", ""]
        sizes = result["sizes"]
        lines += [f"Size: ditq W8A8 is {sizes[DITQ] / sizes[FP32]:.3f}x the FP32 export"
                  + (f", {sizes[EMBEDDERS] / sizes[FP32]:.3f}x with the embedders and the final layer quantized too "
                     "(`--quantize-embedders`)" if EMBEDDERS in sizes else "") + ".", ""]
        compile_info = result["compiles"][DITQ]
        peak, fp32 = compile_info["peak_bytes"], result["fp32_bytes"]
        phases = ", ".join(f"{label} {rss / 1e9:.2f} GB / {seconds:.0f} s"
                           for label, rss, seconds in compile_info["phases"])
        lines += [f"Compile (ditq W8A8, a child process): {compile_info['seconds']:.0f} s, peak host memory "
                  f"{peak / 1e9:.2f} GB (the child's high-water mark, VmHWM) = {peak / fp32:.2f}x the FP32 model ({fp32 / 1e9:.2f} GB; goal at most "
                  f"{MEMORY_GOAL}x). Peak resident memory and time by phase (\"{OUTSIDE_PHASES}\": the fx passes other "
                  f"than calibration, and the steps between phases such as writing the manifest and loading the "
                  f"artifact back): {phases}.", ""]
        if GROUPS4 in latency[batches[0]]:
            b = batches[0]
            one, four = latency[b][DITQ], latency[b][GROUPS4]
            growth = (result["sizes"][GROUPS4] - result["sizes"][DITQ]) / 3
            lines += [f"Timestep groups (W8A8 minmax, `--groups 4 --grouping uniform` vs 1 group, batch {b}): latency "
                      f"{four:.1f} ms vs {one:.1f} ms ({four / one - 1:+.1%}); size {result['sizes'][GROUPS4]:.2f} MB "
                      f"vs {result['sizes'][DITQ]:.2f} MB, {growth * 1e3:.1f} kB per extra group; compile "
                      f"{result['compiles'][GROUPS4]['seconds']:.0f} s.", ""]
        if 2 in latency:
            lines += ["Goals of issue 11 at batch 2 on this CPU:", "", *goal_lines(result, 2), ""]
        if result["profile"]:
            lines += [f"### Where the time goes: DiT-{size}/2, batch {args.profile_batch}", "",
                      f"ONNX Runtime's profiler, kernel times summed by op type, median of {args.profile_runs} runs "
                      "(the profiler's own overhead included, so the wall time exceeds the latency table's):", "",
                      *profile_table(result["profile"]), ""]
            others = result["profile"][DITQ]["others"]
            lines += [f"Largest of the others ({DITQ}): " + ", ".join(
                f"{op} {ms:.1f}" for op, ms in list(others.items())[:6]) + " ms.", ""]
        if result["ablation"]:
            lines += ablation_lines(result["ablation"], args.profile_batch)
        sections[size] = lines[section_start:]
        del lines[section_start:]
    for size in [*SHAPES, *[s for s in sections if s not in SHAPES]]:
        lines += sections.get(size, [])
    for block in marked_blocks(path):  # the sections other benchmarks write between their markers, kept as they are
        lines += ["", *block]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def _old_sections(path: Path) -> dict[str, list[str]]:
    """The model sections (``## DiT-<size>/2`` to the next one) of an earlier report, by size."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if MARKER.fullmatch(line.strip()):
            current = None  # another benchmark's marked section: not part of a model's
        if line.startswith(SECTION):
            current = line[len(SECTION):].split("/", 1)[0]
            sections[current] = []
        if current is not None:
            sections[current].append(line)
    return sections


def compare_profiles(paths: list[Path], args) -> None:
    """Profile several models on the same inputs, runs interleaved model by model, and print the table."""
    feeds = latency_feeds(args.profile_batch)
    with tempfile.TemporaryDirectory(prefix="ditq-profile-") as tmp:
        rounds = [{str(p): profile_by_op(p, feeds, threads=args.threads, runs=args.profile_runs, work_dir=Path(tmp))
                   for p in paths} for _ in range(args.profile_rounds)]
    merged = {}
    for path in map(str, paths):
        runs = [r[path] for r in rounds]
        merged[Path(path).parent.name + "/" + Path(path).name] = {
            "categories": {c: statistics.median(r["categories"][c] for r in runs) for c in runs[0]["categories"]},
            "nodes": runs[0]["nodes"], "kernel_total_ms": statistics.median(r["kernel_total_ms"] for r in runs),
            "wall_ms": statistics.median(r["wall_ms"] for r in runs)}
    print("\n".join(profile_table(merged)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["S", "B"], choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--calib-steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=2)
    parser.add_argument("--eval-points", type=int, default=4, help="held-out timesteps the error is measured at")
    parser.add_argument("--runs", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--xl-runs", type=int, default=5, help="at most this many rounds for DiT-XL/2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile-model", default="B", help="the model whose W8A8 artifact is profiled")
    parser.add_argument("--profile-batch", type=int, default=2)
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--profile-rounds", type=int, default=3, help="--compare-profile: interleaved rounds")
    parser.add_argument("--skip-peers", action="store_true", help="no quantize_static rows (slow on XL)")
    parser.add_argument("--skip-groups", action="store_true", help="no 4-timestep-group compile")
    parser.add_argument("--skip-embedders", action="store_true", help="no --quantize-embedders compile")
    parser.add_argument("--skip-ablation", action="store_true",
                        help="no variants with one change taken back (on the --profile-model)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (checkpoints, artifacts)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    parser.add_argument("--compare-profile", nargs="+", type=Path, metavar="MODEL")
    parser.add_argument("--compile-child", nargs=7,
                        metavar=("CKPT", "OUT", "REPORT", "STEPS", "SAMPLES", "GROUPS", "OPTIONS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_child:
        checkpoint, output, report, steps, samples, groups, options = args.compile_child
        compile_child(checkpoint, output, report, int(steps), int(samples), int(groups), json.loads(options))
        return
    if args.compare_profile:
        compare_profiles(args.compare_profile, args)
        return
    with work_directory(args.keep, "ditq-bench-") as work:
        results = [bench_model(size, work, args) for size in args.models]
    write_report(results, args, args.out)
    print(args.out.read_text())


if __name__ == "__main__":
    os.environ.setdefault("DITQ_PROGRESS_SECONDS", "60")
    main()
