"""Low-bit formats side by side: writes the ``formats-bench`` section of docs/benchmarks.md.

For random-weight DiT shapes (``bench_speed.random_dit``: S/2 and B/2 of the DiT paper, 256 tokens), one
artifact per format variant (W8A8; W4A8 per channel and block-wise; FP8; FP4; dynamic activations), each
compiled from the same checkpoint and calibration settings. Per variant: the size of ``model.onnx``, ONNX Runtime
CPU latency at batch 2 (every model timed in the same interleaved rounds, ``common.latencies_ms``), the
relative L2 error of the output vs the FP32 export on held-out denoiser inputs from several timesteps
(``bench_speed.eval_inputs``), and the kernels ONNX Runtime ran for the quantized linears (its optimized graph,
``exporters/ort_inspect.py``, as the manifest records it).

A second table times one DiT-B/2-shaped linear (512 tokens x 768 -> 3072: fc1 at batch 2) in each kernel
form: the measurement that chose per-channel int4 as W4A8's default over ``--weight-block``.

    python bench/bench_formats.py                                       # S and B, every variant
    python bench/bench_formats.py --models S --calib-steps 4 --runs 3   # a quick check that it works
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import SHAPES, eval_inputs, latency_feeds, random_dit  # noqa: E402
from common import (close_sessions, export_fp32, file_size_mb, latencies_ms, machine_description,  # noqa: E402
                    relative_l2, run_command, run_output, work_directory, write_marked_block)

BLOCK = "formats-bench"
FP32 = "FP32 export"


def variants(blocks: list[int]) -> dict[str, dict]:
    """Row name -> CompileConfig options."""
    rows = {
        "w8a8": dict(format="w8a8"),
        "w4a8 per-channel": dict(format="w4a8"),
        **{f"w4a8 block {b}": dict(format="w4a8", weight_block=b) for b in blocks},
        "fp8": dict(format="fp8"),
        "fp4": dict(format="fp4"),
        "w8a8 dynamic": dict(format="w8a8", act="dynamic"),
        "w4a8 per-channel dynamic": dict(format="w4a8", act="dynamic"),
    }
    if blocks:
        rows[f"w4a8 block {blocks[0]} dynamic"] = dict(format="w4a8", weight_block=blocks[0], act="dynamic")
    return rows


def bench_model(size: str, work: Path, args) -> dict:
    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler import compile as compile_checkpoint
    from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG

    print(f"== DiT-{size}/2", file=sys.stderr)
    model = random_dit(size, args.seed)
    checkpoint = work / f"dit-{size}"
    model.save_pretrained(checkpoint, safe_serialization=True)
    paths = {FP32: work / f"dit-{size}-fp32.onnx"}
    export_fp32(model, paths[FP32])
    kernels, seconds, failed = {}, {}, {}
    for name, options in variants(args.blocks).items():
        if args.only and name not in args.only:
            continue
        print(f"   compiling {name}", file=sys.stderr)
        config = CompileConfig(calibration=CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples),
                               **options)
        start = time.perf_counter()
        try:
            artifact = compile_checkpoint(checkpoint, work / f"dit-{size}-{name.replace(' ', '-')}", config,
                                          force=True)
        except Exception as error:  # a variant that fails is reported, not fatal to the others
            failed[name] = f"{type(error).__name__}: {error}".splitlines()[0]
            continue
        seconds[name] = time.perf_counter() - start
        paths[name] = artifact.model_path
        kernels[name] = artifact.manifest["fusion"]["kernels"]
    timesteps, evals = eval_inputs(model, DEFAULT_SCHEDULER_CONFIG, args)
    del model
    reference = [run_output(paths[FP32], batch) for batch in evals]
    errors = {name: max(relative_l2(run_output(path, batch), ref) for batch, ref in zip(evals, reference))
              for name, path in paths.items() if name != FP32}
    close_sessions()
    latency = latencies_ms(paths, latency_feeds(args.batch), threads=args.threads, rounds=args.runs)
    return {"size": size, "sizes": {name: file_size_mb(path) for name, path in paths.items()}, "latency": latency,
            "errors": errors, "kernels": kernels, "seconds": seconds, "failed": failed, "timesteps": timesteps}


def layer_bench(args) -> dict[str, float]:
    """One linear, 512 x 768 -> 3072, int4 weights in each kernel form ONNX Runtime's CPU provider has."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ditq_compiler.exporters.lowering.cuda import pack_nbits

    m, k, n = 512, 768, 3072
    rng = np.random.default_rng(0)
    weight = rng.integers(-7, 8, size=(k, n)).astype(np.int8)
    scale = rng.uniform(0.001, 0.01, n).astype(np.float32)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    x_scale = numpy_helper.from_array(np.array(0.03, np.float32), "xs")
    x_zero = numpy_helper.from_array(np.array(128, np.uint8), "xz")
    int4 = helper.make_tensor("w4", TensorProto.INT4, [k, n], weight.flatten().tolist())
    columns = [numpy_helper.from_array(scale, "ws"), numpy_helper.from_array(np.zeros(n, np.int8), "wz")]
    qdq = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
           helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    forms = {
        "FP32 MatMul": ([helper.make_node("MatMul", ["x", "w"], ["y"])],
                        [numpy_helper.from_array(weight.astype(np.float32) * scale, "w")]),
        "per-channel int4, static: Cast -> MatMulIntegerToFloat (default)": (
            [helper.make_node("Cast", ["w4"], ["w8"], to=TensorProto.INT8), *qdq,
             helper.make_node("DequantizeLinear", ["w8", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])], [int4, x_scale, x_zero, *columns]),
        "per-channel int4, dynamic: Cast -> DynamicQuantizeMatMul": (
            [helper.make_node("Cast", ["w4"], ["w8"], to=TensorProto.INT8),
             helper.make_node("DynamicQuantizeMatMul", ["x", "w8", "ws", "wz"], ["y"], domain="com.microsoft")],
            [int4, *columns]),
    }
    for block in args.layer_blocks:
        packed = numpy_helper.from_array(pack_nbits(weight, 4, block), "b")
        scales = numpy_helper.from_array(np.repeat(scale, k // block), "s")  # [N, blocks], N-major

        def nbits(a: str, level: int):
            return helper.make_node("MatMulNBits", [a, "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                                    block_size=block, accuracy_level=level)

        forms[f"block {block}, static: Q/DQ -> MatMulNBits level 1"] = ([*qdq, nbits("xd", 1)],
                                                                          [packed, scales, x_scale, x_zero])
        forms[f"block {block}, dynamic: MatMulNBits level 4"] = ([nbits("x", 4)], [packed, scales])
    paths = {}
    with tempfile.TemporaryDirectory(prefix="ditq-layer-") as tmp:
        for index, (name, (nodes, initializers)) in enumerate(forms.items()):
            graph = helper.make_graph(nodes, "linear",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])], initializers)
            model = helper.make_model(graph, opset_imports=opsets)
            model.ir_version = 10
            paths[name] = Path(tmp) / f"form{index}.onnx"
            onnx.save(model, paths[name])
        feeds = {"x": rng.normal(size=(1, m, k)).astype(np.float32)}
        return latencies_ms(paths, feeds, threads=args.threads, rounds=args.layer_runs)


def report_lines(results: list[dict], layer: dict[str, float] | None, args) -> list[str]:
    command = run_command("bench/bench_formats.py", sys.argv[1:])
    lines = ["## Low-bit formats", "",
             f"Written by `{command}` on {datetime.date.today().isoformat()}; {machine_description()}.", "",
             f"- Each row is an artifact compiled from the same random-weight checkpoint (minmax recipe, "
             f"{args.calib_samples} samples x {args.calib_steps} calibration steps, float attention (the "
             "default), one timestep group) for the CPU target.",
             f"- Latency: ONNX Runtime CPU provider, batch {args.batch}, {args.threads} threads, median of "
             f"{args.runs} interleaved rounds. Error: relative L2 of the output vs the FP32 export, the largest "
             f"over {args.eval_points} held-out denoiser inputs spread over a sampling trajectory.",
             "- Kernels: what ONNX Runtime's optimized graph runs for the quantized linears (count of layers).",
             "- `dynamic`: activations quantized by the kernel at run time (`--act dynamic`), no calibrated "
             "activation scales.", ""]
    for result in results:
        fp32 = result["latency"][FP32]
        lines += [f"### DiT-{result['size']}/2", "",
                  f"Held-out timesteps: {', '.join(map(str, result['timesteps']))}.", "",
                  "| variant | model.onnx MB | latency ms | vs FP32 | rel. L2 error | kernels | compile s |",
                  "|---|---:|---:|---:|---:|---|---:|",
                  f"| {FP32} | {result['sizes'][FP32]:.1f} | {fp32:.1f} | 1.00x | 0 | MatMul, Gemm | |"]
        for name in result["kernels"]:
            kernels = ", ".join(f"{op} {count}" for op, count in sorted(result["kernels"][name].items()))
            lines.append(f"| {name} | {result['sizes'][name]:.1f} | {result['latency'][name]:.1f} | "
                         f"{fp32 / result['latency'][name]:.2f}x | {result['errors'][name]:.4f} | {kernels} | "
                         f"{result['seconds'][name]:.0f} |")
        for name, why in result["failed"].items():
            lines.append(f"| {name} | | | | | failed: {why} | |")
        lines.append("")
    if layer:
        fp32 = layer["FP32 MatMul"]
        lines += ["### One linear: the kernel forms of int4 weights", "",
                  f"512 tokens x 768 -> 3072 (DiT-B/2's fc1 at batch 2), {args.threads} threads, median of "
                  f"{args.layer_runs} interleaved rounds. This chose W4A8's default: per-channel scales on "
                  "`MatMulIntegerToFloat` unless a block-wise form is faster.", "",
                  "| form | latency ms | vs FP32 |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.2f} | {fp32 / ms:.2f}x |" for name, ms in layer.items()]
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["S", "B"], choices=[s for s in SHAPES if s != "XL"])
    parser.add_argument("--blocks", nargs="*", type=int, default=[32, 64, 128], help="--weight-block rows")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="only these rows (names as in the table)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calib-steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=2)
    parser.add_argument("--eval-points", type=int, default=4, help="held-out timesteps the error is measured at")
    parser.add_argument("--runs", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--layer-blocks", nargs="*", type=int, default=[32, 64, 128])
    parser.add_argument("--layer-runs", type=int, default=30)
    parser.add_argument("--skip-layer", action="store_true", help="no single-linear table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (checkpoints, artifacts)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    args = parser.parse_args()
    layer = None if args.skip_layer else layer_bench(args)
    with work_directory(args.keep, "ditq-formats-") as work:
        results = [bench_model(size, work, args) for size in args.models]
    lines = report_lines(results, layer, args)
    write_marked_block(args.out, BLOCK, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("DITQ_PROGRESS_SECONDS", "60")
    main()
