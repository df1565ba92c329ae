"""What the smoothing recipes' options cost at run time and on disk: writes a section of docs/benchmarks.md.

On a random-weight DiT of the paper's S/2 (or B/2) shape, W8A8, ONNX Runtime CPU provider, batch 2, in one run:

* ``--unfoldable skip`` vs ``mul`` (SmoothQuant): fc2's and the adaLN linear's inputs have no exact fold; ``mul``
  smooths them with an explicit Mul before their quantizer. Reported: latency, the Mul nodes it adds, size.
* HTG's smoothing scale shared by the timestep groups (the default: int8 weights stay shared, only biases and
  activation parameters differ) vs one scale per group (every group stores its own folded weights): the
  artifact's size per extra group, against the same recipe with one group.

Every row must fuse every quantized layer in every branch (checked in ONNX Runtime's optimized graph, as the
compile does); latency is the median of interleaved rounds (``bench/common.py``).

    python bench/bench_recipes.py                 # DiT-S/2
    python bench/bench_recipes.py --model B --rounds 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import SHAPES, latency_feeds, random_dit  # noqa: E402
from common import file_size_mb, latencies_ms, machine_description, write_marked_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BLOCK = "recipes-bench"  # the markers of this section in docs/benchmarks.md
ROWS: dict[str, dict] = {  # label -> CompileConfig keyword arguments (all W8A8)
    "smoothquant, unfoldable skip": dict(recipe="smoothquant", unfoldable="skip"),
    "smoothquant, unfoldable mul": dict(recipe="smoothquant", unfoldable="mul"),
    "htg, 1 group": dict(recipe="htg"),
    "htg, 4 groups, scales shared": dict(recipe="htg", groups=4, grouping="htg", smooth_scales="shared"),
    "htg, 4 groups, scales per group": dict(recipe="htg", groups=4, grouping="htg", smooth_scales="per-group"),
}


def graph_op_count(model_path: Path, op_type: str) -> int:
    """``op_type`` nodes in the artifact, inside ``If`` branches too."""
    import onnx

    def count(graph) -> int:
        total = 0
        for node in graph.node:
            total += node.op_type == op_type
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    total += count(attribute.g)
        return total
    return count(onnx.load(str(model_path), load_external_data=False).graph)


def run(args) -> list[str]:
    from ditq_compiler import CalibrationConfig, CompileConfig
    from ditq_compiler import compile as compile_checkpoint

    with tempfile.TemporaryDirectory(prefix="ditq-bench-recipes-") as tmp:
        work = Path(tmp)
        checkpoint = work / "model"
        random_dit(args.model, args.seed).save_pretrained(checkpoint, safe_serialization=True)
        calibration = CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples)
        paths, facts = {}, {}
        for index, (label, options) in enumerate(ROWS.items()):
            print(f"compiling {label}", flush=True)
            artifact = compile_checkpoint(checkpoint, work / f"a{index}",
                                          CompileConfig(format="w8a8", calibration=calibration, **options))
            manifest = json.loads((artifact.path / "manifest.json").read_text())
            paths[label] = artifact.model_path
            fusion = manifest["fusion"]  # the compile refuses an artifact with an unfused layer
            facts[label] = dict(size=file_size_mb(artifact.model_path), muls=graph_op_count(artifact.model_path, "Mul"),
                                fused=f"{fusion['fused_layers']} of {fusion['quantized_layers']}")
            del artifact
        latency = latencies_ms(paths, latency_feeds(2), rounds=args.rounds)
    skip, mul = "smoothquant, unfoldable skip", "smoothquant, unfoldable mul"
    one, shared, per_group = "htg, 1 group", "htg, 4 groups, scales shared", "htg, 4 groups, scales per group"
    lines = [f"## Recipe options: what they cost (DiT-{args.model}/2 shape, W8A8)", "",
             f"Written by `python bench/bench_recipes.py --model {args.model}` on {datetime.date.today().isoformat()}; "
             f"{machine_description()}; random weights, batch 2, ONNX Runtime CPU provider with 2 threads, median of "
             f"{args.rounds} interleaved rounds; calibration {args.calib_samples} samples x {args.calib_steps} steps.", "",
             "| configuration | size MB | latency ms | Mul nodes in the graph | layers fused |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {facts[label]['size']:.2f} | {latency[label]:.1f} | {facts[label]['muls']} | "
              f"{facts[label]['fused']} |" for label in ROWS]
    lines += ["", f"- `--unfoldable mul` adds {facts[mul]['muls'] - facts[skip]['muls']} Mul nodes and changes latency by "
              f"{100 * (latency[mul] / latency[skip] - 1):+.1f}% ({latency[skip]:.1f} -> {latency[mul]:.1f} ms) "
              "against `skip`.",
              f"- HTG, 4 groups: a shared smoothing scale costs {1000 * (facts[shared]['size'] - facts[one]['size']) / 3:.1f} "
              f"kB per extra group; a scale per group costs {1000 * (facts[per_group]['size'] - facts[one]['size']) / 3:.1f} "
              "kB per extra group (each group's folded weights).", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[m for m in SHAPES if m != "XL"], default="S")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calib-steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-only", action="store_true", help="print the section, leave docs/ alone")
    args = parser.parse_args(argv)
    lines = run(args)
    print("\n".join(lines))
    if not args.print_only:
        write_marked_block(DOCS, BLOCK, lines)
        print(f"wrote a section of {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
