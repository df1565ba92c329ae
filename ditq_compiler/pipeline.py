"""The compile pipeline, declared in one place, and the ``compile`` / ``inspect`` entry points."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .artifact import FORMAT_VERSION, MANIFEST_FILE, MODEL_FILE, Artifact, staging_directory
from .config import CompileConfig
from .context import CompileContext
from .errors import DitqError
from .loading import LoadedCheckpoint, load_checkpoint
from .pass_manager import DumpInstrument, GraphPass, PassInstrument, PassManager, graph_modules
from .passes import (AnnotateLinearQuantization, ChooseMinMaxParams, CollectActivationStats, GroupTimesteps,
                     InsertQuantDequant)
from .qspec import quantized_layer_names
from .tracing import INPUT_NAMES, OUTPUT_NAME, example_inputs, trace_dit

RECIPE_PASSES: dict[str, type[GraphPass]] = {"minmax": ChooseMinMaxParams}


def build_passes(config: CompileConfig) -> list[GraphPass]:
    """The pipeline: decide what to quantize, calibrate, group timesteps, choose parameters per group,
    insert Q/DQ (one branch per group)."""
    return [
        AnnotateLinearQuantization(),
        CollectActivationStats(),
        GroupTimesteps(config.groups, config.grouping),
        RECIPE_PASSES[config.recipe](),
        InsertQuantDequant(),
    ]


@dataclass
class CompileResult:
    graph_module: torch.nn.Module  # a GraphModule, or a TimestepGroupedModule of one per group
    context: CompileContext
    checkpoint: LoadedCheckpoint
    pass_manager: PassManager
    quantized_layers: list[str]


def run_pipeline(checkpoint: str | Path | LoadedCheckpoint, config: CompileConfig | None = None,
                 instruments: list[PassInstrument] | None = None) -> CompileResult:
    """Load, trace and run the passes; returns the quantized fx graph (the torch reference)."""
    config = (config or CompileConfig()).validate()
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    torch.manual_seed(config.calibration.seed)
    check_inputs = example_inputs(loaded.model_config, batch=2, seed=config.calibration.seed)
    gm = trace_dit(loaded.model, check_inputs)
    ctx = CompileContext(config, loaded.model_config, loaded.scheduler_config, check_inputs)
    manager = PassManager(build_passes(config), instruments or [])
    gm = manager.run(gm, ctx)
    return CompileResult(gm, ctx, loaded, manager, quantized_layer_names(graph_modules(gm)[0]))


def build_manifest(result: CompileResult, fusion: dict | None, files: list[str], compile_seconds: float) -> dict:
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
        "files": files,
        "fusion": fusion,
        "passes": [{"name": r.name, "modified": r.modified, "summary": r.summary, "seconds": round(r.seconds, 3)}
                   for r in result.pass_manager.records],
        "compile_seconds": round(compile_seconds, 2),
    }


def compile(checkpoint: str | Path, output_dir: str | Path, config: CompileConfig | None = None, *,
            dump_dir: str | Path | None = None) -> Artifact:
    """Compile ``checkpoint`` into an artifact directory at ``output_dir`` (written atomically)."""
    from .exporters import export_onnx, fusion_report, save_onnx

    start = time.perf_counter()
    instruments = [DumpInstrument(dump_dir)] if dump_dir else []
    result = run_pipeline(checkpoint, config, instruments)
    model = export_onnx(result.graph_module, result.context.model_config)
    with staging_directory(output_dir) as staging:
        files = save_onnx(model, staging / MODEL_FILE)
        fusion = None
        if result.context.config.verify_fusion:
            report = fusion_report(staging / MODEL_FILE, result.quantized_layers)
            if report.unfused:
                raise DitqError(
                    f"ONNX Runtime did not fuse {len(report.unfused)} quantized layers into int8 kernels "
                    f"(e.g. {next(iter(report.unfused.items()))}); the artifact would not run quantized"
                )
            fusion = report.to_manifest()
        manifest = build_manifest(result, fusion, files, time.perf_counter() - start)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return Artifact.load(output_dir)


def _jsonable(config) -> dict:
    return json.loads(json.dumps(dict(config), default=lambda value: list(value) if isinstance(value, tuple) else str(value)))
