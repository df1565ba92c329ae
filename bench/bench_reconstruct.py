"""Reconstruction benchmark: time and peak host memory of ``--reconstruct gptq|brecq|bkd`` per method, on the
reference model (``models/dit-digits``) and on the DiT-S/2 shape (random weights); writes its section of
docs/benchmarks.md (between ``<!-- reconstruct-bench:begin -->`` and ``<!-- reconstruct-bench:end -->``).

Each (model, method) runs the compile pipeline up to Q/DQ insertion (no ONNX export: that is the same for every
method and measured in bench_speed.py) in a child process of its own, so its memory is its own. Columns:

* reconstruction s: the pass's wall time (calibration and the other passes excluded);
* pass peak MB: the process's peak resident memory while the pass ran (sampled by the pass itself), and how much
  of it the pass added over what the process held when it began (the model, the traced graph, calibration);
* process peak MB: the child's peak resident memory over its life (``VmHWM``, read by the child at its end);
* block error: relative L2 of the DiT blocks' outputs vs the float blocks on the calibration rows, nearest
  rounding -> reconstructed (mean over blocks; the pass's own report);
* disk MB: block inputs and targets cached on disk during the pass (removed afterwards).

    python bench/bench_reconstruct.py                                 # both models, every method
    python bench/bench_reconstruct.py --models reference --iters 50   # a quick run
    python bench/bench_reconstruct.py --quality                       # then the W4A8/FP4 quality rows
    python bench/bench_reconstruct.py --memory                        # memory vs depth (its own section)

``--memory`` tests what the pass promises about memory: block values live on disk and one block's training state
is held at a time, so what the pass adds must not grow with the number of blocks. It compiles the DiT-S/2 shape
at several depths (``--depths``, default 3, 6 and 12 blocks) with each method and writes, per depth, the
memory the pass added over its start, the resident memory when the walk reached the first and the last block,
and the largest rise within one block (that block's working set: its two streams, its training state); and a plot
of the resident memory block by block (docs/reconstruct_memory.png). Time is not the point there, so it runs
``--memory-iters`` (default 20) iterations per block: the training state (rounding variables, Adam's moments)
exists from the first step on.

``--quality`` runs bench/bench_quality.py on the rows of bench/quality_rows.py that add a reconstruction to the
best recipe (with 4 HTG groups) and on the same rows without it (30+ minutes on a 2-core CPU); it rewrites
docs/quality.md as bench_quality.py always does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, peak_rss_bytes, run_child, write_marked_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "reconstruct-bench"
MEMORY_SECTION = "reconstruct-memory"
MEMORY_PLOT = ROOT / "docs" / "reconstruct_memory.png"
REFERENCE = ROOT / "models" / "dit-digits"
METHODS = ("none", "gptq", "brecq", "bkd")
DIT_S = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12)  # DiT-S/2: hidden 384, 12 blocks


def random_dit_s(path: Path, seed: int = 0, blocks: int | None = None) -> Path:
    """A random-weight DiT-S/2 (32x32x4 latents, 1000 classes; ``blocks`` DiT blocks, default 12) saved as a
    diffusers directory."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    shape = {**DIT_S, **({"num_layers": blocks} if blocks else {})}
    model = DiTTransformer2DModel(**shape, in_channels=4, out_channels=8, sample_size=32, patch_size=2,
                                  num_embeds_ada_norm=1000).eval()
    with torch.no_grad():  # adaLN-zero starts at zero; give every path signal, as a trained model has
        for parameter in model.parameters():
            if parameter.dim() == 2 and parameter.abs().sum() == 0:
                parameter.normal_(0, 0.02)
    model.save_pretrained(path, safe_serialization=True)
    return path


def child(checkpoint: str, report: str, options: str) -> None:
    """Runs in the child process: the pipeline with ``options`` (CompileConfig fields), then the pass's report."""
    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler.pipeline import run_pipeline

    fields = json.loads(options)
    calibration = CalibrationConfig(**fields.pop("calibration"))
    result = run_pipeline(checkpoint, CompileConfig(calibration=calibration, **fields), keep_float_model=False)
    out = {"passes": {r.name: r.seconds for r in result.pass_manager.records}}
    graph_pass = next((p for p in result.pass_manager.passes if p.name == "reconstruct"), None)
    if graph_pass is not None and graph_pass.report is not None:
        out.update(manifest=graph_pass.manifest_entry() if graph_pass.report.blocks else None,
                   log=graph_pass.log_entry())
    Path(report).write_text(json.dumps({**out, "process_peak": peak_rss_bytes()}))


def measure(checkpoint: Path, method: str, args, work: Path) -> dict:
    options = dict(format=args.format, recipe=args.recipe, groups=args.groups, grouping=args.grouping,
                   reconstruct=method, reconstruct_iters=args.iters, time_budget_min=args.time_budget,
                   calibration=dict(steps=args.calib_steps, samples=args.calib_samples))
    report = work / f"{checkpoint.name}-{method}.json"
    code, seconds = run_child([__file__, "--child", str(checkpoint), str(report), json.dumps(options)])
    if code != 0:
        return {"error": f"exit {code}"}
    return {**json.loads(report.read_text()), "process_seconds": seconds}


def table(name: str, results: dict[str, dict]) -> list[str]:
    lines = [f"### {name}", "",
             "| method | reconstruction s | pass peak MB (added) | process peak MB "
             "| block error nearest -> reconstructed | iterations per block | disk MB |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for method, r in results.items():
        if "error" in r:
            lines.append(f"| {method} | failed ({r['error']}) | | | | | |")
            continue
        peak = f"{r['process_peak'] / 1e6:.0f}"
        if method == "none":
            lines.append(f"| none (nearest rounding) | — | — | {peak} | — | — | — |")
            continue
        log, manifest = r.get("log") or {}, r.get("manifest") or {}
        errors = manifest.get("block_error", {})
        error = f"{errors['nearest']:.4f} -> {errors['reconstructed']:.4f}" if errors else "—"
        iterations = max([b["iterations"] for b in manifest.get("blocks", [])], default=0)
        lines.append(f"| {method} | {log.get('seconds', 0):.1f} | {log.get('peak_host_memory_mb', 0):.0f} "
                     f"({log.get('memory_over_start_mb', 0):+.0f}) | {peak} | {error} | "
                     f"{iterations if method != 'gptq' else '—'} | {log.get('cached_on_disk_mb', 0):.1f} |")
    return lines + [""]


def memory_scaling(args, work: Path) -> list[str]:
    """The ``reconstruct-memory`` section: what each method's pass holds at each depth (see the module doc)."""
    settings = argparse.Namespace(**{**vars(args), "calib_steps": args.dit_s_calib_steps, "iters": args.memory_iters,
                                     "time_budget": None})
    methods = [m for m in args.methods if m != "none"]
    results: dict[tuple[int, str], dict] = {}
    for depth in args.depths:
        checkpoint = random_dit_s(work / f"dit-s-2-{depth}-blocks", blocks=depth)
        for method in methods:
            result = results[depth, method] = measure(checkpoint, method, settings, work)
            print(f"dit-s {depth} blocks {method}: {json.dumps(result.get('log') or result.get('error'))}", flush=True)
    lines = ["## Reconstruction memory vs model depth", "",
             f"Written by `python bench/bench_reconstruct.py --memory` on {datetime.date.today().isoformat()}; "
             f"{machine_description()}. DiT-S/2 shape (random weights, hidden 384) cut to each depth; "
             f"{args.format.upper()} {args.recipe}, {args.groups} groups {args.grouping}, calibration "
             f"{args.calib_samples} samples x {args.dit_s_calib_steps} steps, `--reconstruct-iters "
             f"{args.memory_iters}`. Resident memory is sampled every 50 ms by the pass. If the pass held more than "
             "one block's state (block values in memory, earlier blocks' training state), what it adds would grow "
             "with the depth.", "",
             "| method | blocks | pass added MB | resident at first block -> at last block MB "
             "| largest rise within one block MB | disk MB |",
             "|---|---:|---:|---|---:|---:|"]
    for (depth, method), r in results.items():
        if "error" in r:
            lines.append(f"| {method} | {depth} | failed ({r['error']}) | | | |")
            continue
        log = r.get("log") or {}
        blocks = [b for b in log.get("blocks", []) if "peak_mb" in b]
        if not blocks:
            lines.append(f"| {method} | {depth} | {log.get('memory_over_start_mb', 0):+.0f} | — | — | — |")
            continue
        rise = max(b["peak_mb"] - b["resident_at_start_mb"] for b in blocks)
        lines.append(f"| {method} | {depth} | {log.get('memory_over_start_mb', 0):+.0f} | "
                     f"{blocks[0]['resident_at_start_mb']:.0f} -> {blocks[-1]['resident_at_start_mb']:.0f} | "
                     f"{rise:.0f} | {log.get('cached_on_disk_mb', 0):.1f} |")
    if not args.no_write:
        plot_memory(results, MEMORY_PLOT)
        lines += ["", f"![resident memory block by block]({MEMORY_PLOT.name})"]
    return lines + [""]


def plot_memory(results: dict[tuple[int, str], dict], path: Path) -> None:
    """Resident memory at each block's start and its peak, block by block, one line per (method, depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for (depth, method), r in results.items():
        blocks = [b for b in (r.get("log") or {}).get("blocks", []) if "peak_mb" in b]
        if blocks:
            line, = axis.plot(range(1, len(blocks) + 1), [b["peak_mb"] for b in blocks], marker="o", markersize=3,
                              label=f"{method}, {depth} blocks: peak")
            axis.plot(range(1, len(blocks) + 1), [b["resident_at_start_mb"] for b in blocks], linestyle=":",
                      color=line.get_color())
    axis.set_xlabel("DiT block (walk order)")
    axis.set_ylabel("resident memory, MB (dotted: at the block's start)")
    axis.set_title("Reconstruction pass memory, DiT-S/2 shape")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def quality(args) -> int:
    from quality_rows import reconstruction_quality_rows

    labels = reconstruction_quality_rows()
    command = [sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--rows", *labels]
    print("running:", " ".join(command[1:3]), "--rows", *[repr(label) for label in labels], flush=True)
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["reference", "dit-s"], default=["reference", "dit-s"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--format", default="w4a8")
    parser.add_argument("--recipe", default="ptq4dit")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--grouping", default="htg")
    parser.add_argument("--iters", type=int, default=200, help="--reconstruct-iters (default 200)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MIN")
    parser.add_argument("--calib-steps", type=int, default=25)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--dit-s-calib-steps", type=int, default=10,
                        help="calibration steps for the DiT-S/2 shape (random weights: time and memory only)")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write it")
    parser.add_argument("--quality", action="store_true", help="only run the quality rows (see above)")
    parser.add_argument("--memory", action="store_true", help="only the memory-vs-depth section (see above)")
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 6, 12], help="--memory: DiT-S/2 depths")
    parser.add_argument("--memory-iters", type=int, default=20, help="--memory: --reconstruct-iters (default 20)")
    args = parser.parse_args(argv)
    if args.quality:
        return quality(args)
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="ditq-bench-reconstruct-") as tmp:
            body = memory_scaling(args, Path(tmp))
        print("\n".join(body))
        if not args.no_write:
            write_marked_block(args.out, MEMORY_SECTION, body)
            print(f"wrote the {MEMORY_SECTION} section of {args.out}")
        return 0

    sections = {}
    with tempfile.TemporaryDirectory(prefix="ditq-bench-reconstruct-") as tmp:
        work = Path(tmp)
        for name in args.models:
            if name == "reference":
                checkpoint, title = REFERENCE, "Reference model (`models/dit-digits`, 4 blocks, hidden 128, 16x16x1)"
            else:
                checkpoint = random_dit_s(work / "dit-s-2")
                title = "DiT-S/2 shape (random weights, 12 blocks, hidden 384, 32x32x4 latents)"
            steps = args.calib_steps if name == "reference" else args.dit_s_calib_steps
            settings = argparse.Namespace(**{**vars(args), "calib_steps": steps})
            results = {}
            for method in args.methods:
                results[method] = measure(checkpoint, method, settings, work)
                print(f"{name} {method}: {json.dumps(results[method].get('log') or results[method].get('error'))}",
                      flush=True)
            sections[name] = table(f"{title}; calibration {args.calib_samples} samples x {steps} steps", results)

    body = [f"## Reconstruction time and memory ({args.format.upper()} {args.recipe}, {args.groups} groups "
            f"{args.grouping})", "",
            f"Written by `python bench/bench_reconstruct.py` on {datetime.date.today().isoformat()}; "
            f"{machine_description()}. `--reconstruct-iters {args.iters}`"
            + (f", `--time-budget {args.time_budget:g}`" if args.time_budget is not None else "")
            + "; the calibration rows are the two recorded per calibrated timestep (one conditional, one "
              "unconditional), 4 per minibatch. Each method runs in its own process, up to Q/DQ insertion.", ""]
    for name in args.models:
        body += sections[name]
    print("\n".join(body))
    if not args.no_write:
        write_marked_block(args.out, SECTION, body)
        print(f"wrote the {SECTION} section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
