"""``ditq inspect``: every pass's output, what ONNX Runtime runs, and where the error comes from."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .config import CompileConfig
from .error_analysis import layer_error_report
from .pass_manager import DumpInstrument
from .pipeline import attention_layers, lowering_context_of, run_pipeline, write_and_check


def inspect_checkpoint(checkpoint, dump_dir: str | Path, config: CompileConfig | None = None) -> str:
    """The compile's pipeline (passes, export, lowering for the configured target, ONNX Runtime's fusion check),
    every step dumped into ``dump_dir``, then the per-layer error analysis; nothing is written as an artifact.
    Unlike a compile, a layer ONNX Runtime did not fuse is reported, not refused. ``timings.txt`` ends with the
    time of every phase (the table a compile prints)."""
    from .progress import timed_phases

    dump_dir = Path(dump_dir)
    with timed_phases() as clock:
        report = _inspect(checkpoint, dump_dir, config)
    with open(dump_dir / "timings.txt", "a") as handle:
        handle.write("\n## phases of the whole inspect (wall clock)\n" + "\n".join(clock.table()) + "\n")
    return report


def _inspect(checkpoint, dump_dir: Path, config: CompileConfig | None) -> str:
    from .exporters import export_onnx
    from .exporters.lowering import lower
    from .exporters.ort_inspect import fusion_report
    from .progress import phase

    result = run_pipeline(checkpoint, config, [DumpInstrument(dump_dir)])
    ctx = result.context
    with phase("exporting to ONNX"):
        model = export_onnx(result.graph_module, ctx.signature, ctx.export_inputs())
    layers = result.layers
    lowering_context = lowering_context_of(result)
    with phase(f"lowering for the {ctx.config.target} target"):
        lowered = lower(model, ctx.config.target, layers, context=lowering_context, dump_dir=dump_dir,
                        first_index=len(result.pass_manager.records) + 1)
    del model
    written = write_and_check(lowered, ctx.config.target, layers, lowering_context, dump_dir,
                              integer_attention=attention_layers(result), refuse_unfused=False)
    report = written.report or fusion_report(dump_dir / "model.onnx", layers)
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
    with phase("per-layer error analysis"):
        error_table = layer_error_report(result, dump_dir)
    kernels = Counter(report.layer_ops.values())
    records = [*result.pass_manager.records, *lowered.records]
    passes = "\n".join(f"  {index:03d} {record.name}: {record.summary}"
                       for index, record in enumerate(records, start=1))
    return (f"wrote {len(records)} pass dumps (fx passes, then the {config.target} lowering), timings.txt, "
            f"model.onnx (as lowered), ort_optimized.txt, "
            f"timestep_groups.txt/.png and layer_error.txt/.png to {dump_dir}\n"
            f"passes (each dump lists the per-layer decisions, e.g. every fold and why one was declined):\n"
            f"{passes}\n"
            f"timestep groups:\n{table}\n"
            f"ONNX Runtime kernels for the {len(report.layer_ops)} quantized layers: {dict(kernels)}\n"
            f"largest per-layer errors (relative L2 of the layer output, mean over timesteps):\n{error_table}")
