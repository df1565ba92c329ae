"""``ditq inspect``: every pass's output, what ONNX Runtime runs, and where the error comes from."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .config import CompileConfig
from .error_analysis import layer_error_report
from .pass_manager import DumpInstrument
from .pipeline import run_pipeline


def inspect_checkpoint(checkpoint, dump_dir: str | Path, config: CompileConfig | None = None) -> str:
    from .exporters import export_onnx, fusion_report, save_onnx

    dump_dir = Path(dump_dir)
    result = run_pipeline(checkpoint, config, [DumpInstrument(dump_dir)])
    model = export_onnx(result.graph_module, result.context.model_config)
    save_onnx(model, dump_dir / "model.onnx")
    report = fusion_report(dump_dir / "model.onnx", result.layer_weights)
    lines = [f"# what ONNX Runtime runs ({report.provider}, all optimizations)",
             f"quantized layers fused into int8 kernels: {len(report.layer_ops) - len(report.unfused)} "
             f"of {len(report.layer_ops)}", ""]
    lines += [f"{layer:<48} {op}" for layer, op in report.layer_ops.items()]
    lines += ["", "## op counts of the optimized graph"]
    lines += [f"{count:5d}  {op}" for op, count in sorted(report.op_counts.items())]
    (dump_dir / "ort_optimized.txt").write_text("\n".join(lines) + "\n")

    from .group_plot import groups_table, plot_groups

    groups = result.context.timestep_groups
    table = groups_table(groups)
    (dump_dir / "timestep_groups.txt").write_text(table + "\n")
    config = result.context.config
    plot_groups(groups, result.context.grouping_history, dump_dir / "timestep_groups.png",
                f"{len(groups)} timestep group(s), grouping {config.grouping}")
    error_table = layer_error_report(result, dump_dir)
    kernels = Counter(report.layer_ops.values())
    passes = "\n".join(f"  {index:03d} {record.name}: {record.summary}"
                       for index, record in enumerate(result.pass_manager.records, start=1))
    return (f"wrote {len(result.pass_manager.records) + 1} pass dumps, timings.txt, model.onnx, ort_optimized.txt "
            f"timestep_groups.txt/.png and layer_error.txt/.png to {dump_dir}\n"
            f"passes (each dump lists the per-layer decisions, e.g. every fold and why one was declined):\n"
            f"{passes}\n"
            f"timestep groups:\n{table}\n"
            f"ONNX Runtime kernels for the {len(report.layer_ops)} quantized layers: {dict(kernels)}\n"
            f"largest per-layer errors (relative L2 of the layer output, mean over timesteps):\n{error_table}")
