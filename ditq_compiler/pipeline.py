"""The compile pipeline, declared in one place, and the ``compile`` / ``inspect`` entry points."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .artifact import FORMAT_VERSION, MODEL_FILE, Artifact, staging_directory
from .config import CompileConfig
from .context import CompileContext
from .errors import DitqError
from .loading import LoadedCheckpoint, load_checkpoint
from .pass_manager import DumpInstrument, GraphPass, PassInstrument, PassManager, graph_modules
from .passes import (AnnotateLinearQuantization, CollectActivationStats, GroupTimesteps, InsertQuantDequant,
                     SplitTimestepGroups)
from .passes.recipes import recipe_passes
from .qspec import layer_records, quantized_layer_weights
from .tracing import INPUT_NAMES, OUTPUT_NAME, example_inputs, trace_dit


def build_passes(config: CompileConfig) -> list[GraphPass]:
    """The pipeline: decide what to quantize, calibrate, group timesteps, split the graph into one branch
    per group, run the recipe on every branch (smoothing, its folds, parameters), insert Q/DQ."""
    return [
        AnnotateLinearQuantization(),
        CollectActivationStats(),
        GroupTimesteps(config.groups, config.grouping),
        SplitTimestepGroups(),
        *recipe_passes(config),
        InsertQuantDequant(),
    ]


@dataclass
class CompileResult:
    graph_module: torch.nn.Module  # a GraphModule, or a TimestepGroupedModule of one per group
    context: CompileContext
    checkpoint: LoadedCheckpoint
    pass_manager: PassManager
    layer_weights: dict[str, str]  # quantized layer key -> its weight tensor's name

    @property
    def layers(self) -> dict:
        """Layer key -> LayerRecord (weight name, weight format, bias form, role), for lowering."""
        return layer_records(graph_modules(self.graph_module)[0])

    @property
    def quantized_layers(self) -> list[str]:
        return list(self.layer_weights)


def run_pipeline(checkpoint: str | Path | LoadedCheckpoint, config: CompileConfig | None = None,
                 instruments: list[PassInstrument] | None = None) -> CompileResult:
    """Load, trace and run the passes; returns the quantized fx graph (the torch reference)."""
    from .progress import phase

    config = (config or CompileConfig()).validate()
    if isinstance(checkpoint, LoadedCheckpoint):
        loaded = checkpoint
    else:
        with phase("loading the checkpoint"):
            loaded = load_checkpoint(checkpoint)
    config.calibration.validate(int(loaded.scheduler_config.get("num_train_timesteps", 1000)))
    torch.manual_seed(config.calibration.seed)
    check_inputs = example_inputs(loaded.model_config, batch=2, seed=config.calibration.seed)
    with phase("tracing"):
        gm = trace_dit(loaded.model, check_inputs)
    ctx = CompileContext(config, loaded.model_config, loaded.scheduler_config, check_inputs)
    manager = PassManager(build_passes(config), instruments or [])
    gm = manager.run(gm, ctx)
    return CompileResult(gm, ctx, loaded, manager, quantized_layer_weights(graph_modules(gm)[0]))


def build_manifest(result: CompileResult, fusion: dict | None, files: list[str]) -> dict:
    """Everything about the artifact except wall-clock times (those go to compile_log.json), so the same
    checkpoint, options and seed give the same bytes. Hashes and the seal are added by write_manifest."""
    config = result.context.config
    stats = result.context.stats
    return {
        "format_version": FORMAT_VERSION,
        "ditq_version": __version__,
        "model": {"class": result.checkpoint.model_class, "config": _jsonable(result.checkpoint.model_config)},
        "source": {"path": result.checkpoint.source, "sha256": result.checkpoint.sha256},
        **config.to_manifest(),
        "seed": config.calibration.seed,
        "timestep_groups": [g.to_manifest() for g in result.context.timestep_groups],
        "calibration_timesteps": list(stats.timesteps) if stats else [],
        "scheduler": _jsonable(result.checkpoint.scheduler_config),
        "inputs": {
            INPUT_NAMES[0]: {"dtype": "float32", "shape": ["batch", "channels", "height", "width"]},
            INPUT_NAMES[1]: {"dtype": "int64", "shape": ["batch"]},
            INPUT_NAMES[2]: {"dtype": "int64", "shape": ["batch"]},
        },
        "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": ["batch", "out_channels", "height", "width"]}},
        "quantized_layers": result.quantized_layers,
        "quantized_weights": result.layer_weights,
        "layers": {key: record.to_manifest() for key, record in result.layers.items()},
        "files": files,
        "fusion": fusion,
        "passes": [{"name": r.name, "modified": r.modified, "summary": r.summary}
                   for r in result.pass_manager.records],
    }


def compile(checkpoint: str | Path, output_dir: str | Path, config: CompileConfig | None = None, *,
            dump_dir: str | Path | None = None, force: bool = False) -> Artifact:
    """Compile ``checkpoint`` into an artifact directory at ``output_dir`` (written atomically).

    ``output_dir`` may be missing, empty or a ditq artifact; any other directory is replaced only with
    ``force`` (its contents are deleted)."""
    return compile_with_result(checkpoint, output_dir, config, dump_dir=dump_dir, force=force)[0]


def compile_with_result(checkpoint: str | Path, output_dir: str | Path, config: CompileConfig | None = None, *,
                        dump_dir: str | Path | None = None, force: bool = False) -> tuple[Artifact, CompileResult]:
    """:func:`compile`, also returning the pipeline's result (the torch fake-quant graph the artifact was
    exported from, its context and pass records)."""
    from .artifact import check_output_dir, write_manifest
    from .exporters import export_onnx, fusion_report, save_onnx
    from .exporters.lowering import lower
    from .progress import phase

    check_output_dir(output_dir, force)  # refuse a user's directory before minutes of work, not after
    start = time.perf_counter()
    instruments = [DumpInstrument(dump_dir)] if dump_dir else []
    result = run_pipeline(checkpoint, config, instruments)
    with phase("exporting to ONNX"):
        model = export_onnx(result.graph_module, result.context.model_config)
    with phase("lowering for the CPU provider"):
        lowered = lower(model, "cpu", result.layers, dump_dir=dump_dir,
                        first_index=len(result.pass_manager.records) + 1)
        model = lowered.model
    with staging_directory(output_dir, force=force) as staging:
        with phase("writing the artifact"):
            files = save_onnx(model, staging / MODEL_FILE)
        fusion = None
        if result.context.config.verify_fusion:
            with phase("checking ONNX Runtime's fusion"):
                report = fusion_report(staging / MODEL_FILE, result.layer_weights)
            if report.unfused:
                raise DitqError(
                    f"ONNX Runtime did not fuse {len(report.unfused)} quantized layers into int8 kernels "
                    f"(e.g. {next(iter(report.unfused.items()))}); the artifact would not run quantized"
                )
            fusion = report.to_manifest()
        with phase("checking ONNX Runtime's numerics against the torch graph"):
            numerics = check_numerics(staging / MODEL_FILE, result)
        compile_log = {"compile_seconds": round(time.perf_counter() - start, 2),
                       "passes": [{"name": r.name, "seconds": round(r.seconds, 3)}
                                  for r in result.pass_manager.records]}
        lowering = {"target": "cpu", "passes": [{"name": r.name, "modified": r.modified, "summary": r.summary}
                                                for r in lowered.records]}
        compile_log["lowering"] = [{"name": r.name, "seconds": round(r.seconds, 3)} for r in lowered.records]
        write_manifest(staging, {**build_manifest(result, fusion, files), "lowering": lowering,
                                 "numerics": numerics.to_manifest()}, compile_log)
    return Artifact.load(output_dir), result


def check_numerics(model_path: Path, result: CompileResult):
    """ONNX Runtime against the torch fake-quant graph on recorded calibration inputs, per timestep group;
    an artifact that disagrees is refused (``ditq_compiler.numerics`` states the tolerance)."""
    from .numerics import check_against_torch
    from .runtime import create_session

    config = result.context.config
    session = create_session(model_path, "cpu", weight_range=config.weight_range)
    report = check_against_torch(session, result.graph_module, result.context.check_inputs_by_group())
    if not report.ok:
        group, worst = report.worst
        hint = ""
        if config.weight_range == "full":
            hint = "; this CPU's int8 kernels may saturate full-range weights: try --weight-range reduced"
        raise DitqError(f"ONNX Runtime's output differs from the torch fake-quant graph in timestep group {group} "
                        f"({worst.describe()}); the artifact would not compute what was calibrated{hint}")
    return report


def _jsonable(config) -> dict:
    return json.loads(json.dumps(dict(config), default=lambda value: list(value) if isinstance(value, tuple) else str(value)))
