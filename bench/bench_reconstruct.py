"""Reconstruction benchmark: time and peak host memory of ``--reconstruct gptq|brecq|bkd`` per method, on the
reference model (``models/dit-digits``) and on the DiT-S/2 shape (random weights); writes its section of
docs/benchmarks.md (between ``<!-- reconstruct-bench:begin -->`` and ``<!-- reconstruct-bench:end -->``).

Each (model, method) runs the compile pipeline up to Q/DQ insertion (no ONNX export: that is the same for every
method and measured in bench_speed.py) in a child process of its own, so its memory is its own. Columns:

* reconstruction s: the pass's wall time (calibration and the other passes excluded);
* pass peak MB: the process's peak resident memory while the pass ran (sampled by the pass itself), and how much
  of it the pass added over what the process held when it began (the model, the traced graph, calibration);
* process peak MB: the child's lifetime peak (``ru_maxrss``);
* block error: relative L2 of the DiT blocks' outputs vs the float blocks on the calibration rows, nearest
  rounding -> reconstructed (mean over blocks; the pass's own report);
* disk MB: block inputs and targets cached on disk during the pass (removed afterwards).

    python bench/bench_reconstruct.py                                 # both models, every method
    python bench/bench_reconstruct.py --models reference --iters 50   # a quick run
    python bench/bench_reconstruct.py --quality                       # then the W4A8/FP4 quality rows

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
from common import machine_description, run_child, write_marked_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "reconstruct-bench"
REFERENCE = ROOT / "models" / "dit-digits"
METHODS = ("none", "gptq", "brecq", "bkd")
DIT_S = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12)  # DiT-S/2: hidden 384, 12 blocks


def random_dit_s(path: Path, seed: int = 0) -> Path:
    """A random-weight DiT-S/2 (32x32x4 latents, 1000 classes) saved as a diffusers directory."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**DIT_S, in_channels=4, out_channels=8, sample_size=32, patch_size=2,
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
    Path(report).write_text(json.dumps(out))


def measure(checkpoint: Path, method: str, args, work: Path) -> dict:
    options = dict(format=args.format, recipe=args.recipe, groups=args.groups, grouping=args.grouping,
                   reconstruct=method, reconstruct_iters=args.iters, time_budget_min=args.time_budget,
                   calibration=dict(steps=args.calib_steps, samples=args.calib_samples))
    report = work / f"{checkpoint.name}-{method}.json"
    code, seconds, peak = run_child([__file__, "--child", str(checkpoint), str(report), json.dumps(options)])
    if code != 0:
        return {"error": f"exit {code}"}
    return {**json.loads(report.read_text()), "process_seconds": seconds, "process_peak": peak}


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
    args = parser.parse_args(argv)
    if args.quality:
        return quality(args)

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
