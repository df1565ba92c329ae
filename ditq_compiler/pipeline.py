"""The compile pipeline, declared in one place, and the ``compile`` / ``inspect`` entry points."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .artifact import FORMAT_VERSION, MODEL_FILE, Artifact, staging_directory
from .config import CompileConfig
from .context import CompileContext
from .errors import DitqError
from .loading import LoadedCheckpoint, load_checkpoint
from .memory import release_freed_memory
from .pass_manager import DumpInstrument, GraphPass, PassInstrument, PassManager, graph_modules
from .passes import (AnnotateLinearQuantization, CollectActivationStats, GroupTimesteps, InsertQuantDequant,
                     SplitTimestepGroups)
from .passes.recipes import recipe_passes
from .qspec import PROVENANCE_KEY, layer_records, quantized_layer_weights


def build_passes(config: CompileConfig) -> list[GraphPass]:
    """The pipeline: decide what to quantize, calibrate, group timesteps, split the graph into one branch
    per group, run the recipe on every branch (smoothing, its folds, parameters), insert Q/DQ."""
    from .passes.dedup import DeduplicateSubgraphs
    from .passes.attention import InsertAttentionQDQ
    from .passes.rotation import RotateHadamard
    from .passes.reconstruct import reconstruction_passes

    return [
        DeduplicateSubgraphs(),  # right after tracing: identical subgraphs computed and stored once
        AnnotateLinearQuantization(),
        *([RotateHadamard()] if config.rotate == "hadamard" else []),
        CollectActivationStats(),
        GroupTimesteps(config.groups, config.grouping),
        SplitTimestepGroups(),
        *recipe_passes(config),
        *reconstruction_passes(config),  # learned rounding, after the parameters are chosen (--reconstruct)
        InsertQuantDequant(),
        *([InsertAttentionQDQ()] if config.attention_spec is not None else []),
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
        return layer_records(graph_modules(self.graph_module))

    @property
    def quantized_layers(self) -> list[str]:
        return list(self.layer_weights)


def run_pipeline(checkpoint: str | Path | LoadedCheckpoint, config: CompileConfig | None = None,
                 instruments: list[PassInstrument] | None = None, *, keep_float_model: bool = True,
                 before_work: Callable[[LoadedCheckpoint, CompileConfig], None] | None = None) -> CompileResult:
    """Load, trace and run the passes; returns the quantized fx graph (the torch reference).

    ``keep_float_model=False`` (a compile, where nothing after tracing reads the float model): a checkpoint
    loaded here is traced without copying its tensors and its model is dropped (``result.checkpoint.model``
    is None), so the weights are held once, not twice. ``inspect`` keeps it: error analysis runs it.
    ``before_work`` runs once the checkpoint is loaded and checked, before calibration (a compile checks its
    free disk space there)."""
    from .progress import phase

    config = (config or CompileConfig()).validate()
    owned = not isinstance(checkpoint, LoadedCheckpoint)  # a caller's LoadedCheckpoint is never changed
    if not owned:
        loaded = checkpoint
    else:
        with phase("loading the checkpoint"):
            loaded = load_checkpoint(checkpoint, num_heads=config.num_heads)
    family = loaded.family
    config.calibration.validate(int(loaded.scheduler_config.get("num_train_timesteps", 1000)))
    torch.manual_seed(config.calibration.seed)
    refuse_uncalibratable(loaded, config)  # --prompts on DiT, PixArt without encoder or recording: before work
    if before_work is not None:
        before_work(loaded, config)
    recording = None
    if family.calibrates_through_pipeline:  # the user's diffusers pipeline runs before tracing, on the float model
        recording = pipeline_recording(loaded, config)
        check_inputs = recording.check_inputs()
    else:
        check_inputs = family.example_inputs(loaded.model_config, batch=2, seed=config.calibration.seed)
    drop_model = owned and not keep_float_model
    with phase("tracing"):
        from .tracing import trace_model

        gm = trace_model(loaded.model, family, loaded.model_config, check_inputs, own_tensors=not drop_model)
    if drop_model:
        loaded.model = None  # the graph holds its tensors now; passes may rewrite them
    if config.layer_rules:  # a rule matching no layer is refused now, not after minutes of calibration
        from .tracing import linear_sites

        config.select_layers(list(dict.fromkeys(site.module for site in linear_sites(gm))), family)
    ctx = CompileContext(config, loaded.model_config, loaded.scheduler_config, check_inputs, family=family)
    if recording is not None:
        ctx.recorded_calls = recording
    manager = PassManager(build_passes(config), instruments or [])
    with phase("quantization passes"):
        gm = manager.run(gm, ctx)
    return CompileResult(gm, ctx, loaded, manager, quantized_layer_weights(graph_modules(gm)[0]))


def expected_artifact_bytes(model: torch.nn.Module, config: CompileConfig) -> int:
    """A lower bound of the artifact's size: every parameter at the narrowest weight width the compile uses
    (layers kept in float, scales and per-group weights only add to it)."""
    precisions = {config.format_spec.precision} | {r.precision for r in config.layer_rules}
    narrowest = 4 if precisions & {"int4", "fp4"} or config.budget_mb is not None else 8  # a budget may pick int4
    return sum(p.numel() for p in model.parameters()) * narrowest // 8


def refuse_uncalibratable(loaded: LoadedCheckpoint, config: CompileConfig) -> None:
    """A text-to-image family needs its text encoder or recorded inputs: refused in one line before any work."""
    from .errors import ConfigError
    from .recording import missing_encoder_message, pipeline_has_text_encoder

    if not loaded.family.calibrates_through_pipeline:
        if config.calibration.inputs is not None or config.calibration.prompts is not None:
            raise ConfigError(f"--prompts and --calibration-inputs are for text-to-image models; {loaded.model_class} "
                              "calibrates on its own sampling loop")
        return
    if config.calibration.inputs is None and not (loaded.pipeline_dir
                                                  and pipeline_has_text_encoder(Path(loaded.pipeline_dir))):
        raise ConfigError(missing_encoder_message(Path(loaded.pipeline_dir or loaded.source)))


def pipeline_recording(loaded: LoadedCheckpoint, config: CompileConfig):
    """The transformer calls calibration replays: ``--calibration-inputs``, checked against the model, or the
    user's pipeline run on the calibration prompts (``recording.py``)."""
    from .progress import phase
    from .prompts import load_prompts
    from .recording import load_recording, record_pipeline

    calib = config.calibration
    if calib.inputs is not None:
        return load_recording(calib.inputs, loaded.family, loaded.model_config, loaded.scheduler_config)
    prompts = load_prompts(calib.prompts)
    with phase(f"running the diffusers pipeline on {len(prompts)} prompts"):
        return record_pipeline(loaded.pipeline_dir, loaded.family, loaded.model_config, prompts=prompts,
                               steps=calib.steps, guidance_scale=calib.guidance_scale, seed=calib.seed,
                               batch_size=calib.samples, transformer=loaded.model)


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
        **({"calibration_recording": result.context.recording_source}
           if result.context.recording_source is not None else {}),
        "scheduler": _jsonable(result.checkpoint.scheduler_config),
        **result.context.signature.to_manifest(),
        "timestep_domain": result.context.timestep_domain.to_manifest(),
        "quantized_layers": result.quantized_layers,
        "quantized_weights": result.layer_weights,
        "mixed_precision": result.context.mixed_precision or None,
        "layers": {key: record.to_manifest() for key, record in result.layers.items()},
        "files": files,
        "fusion": fusion,
        "passes": [pass_record(r) for r in result.pass_manager.records],
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
    from .artifact import group_model_file, write_manifest
    from .exporters import export_onnx
    from .exporters.lowering import lower
    from .passes.reconstruct import reconstruction_records
    from .progress import phase, timed_phases
    from .staging import require_free_space, writing_into

    instruments = [DumpInstrument(dump_dir)] if dump_dir else []
    # The staging directory is made (and locked) first: a user's directory (without --force), an -o that cannot
    # be written, a mount point and a second compile to the same -o are refused before loading; too little free
    # disk right after loading.
    with timed_phases() as clock, staging_directory(output_dir, force=force) as staging:
        def reserve_space(loaded: LoadedCheckpoint, config: CompileConfig) -> None:
            require_free_space(staging, expected_artifact_bytes(loaded.model, config), f"the artifact {output_dir}")

        result = run_pipeline(checkpoint, config, instruments, keep_float_model=False, before_work=reserve_space)
        release_freed_memory()  # the float weights Q/DQ insertion replaced
        with phase("exporting to ONNX"):
            model = export_onnx(result.graph_module, result.context.signature, result.context.export_inputs())
        target = result.context.config.target
        lowered_layers = result.layers  # lowering passes update what a kernel reads (e.g. FP8's folded weight)
        lowering_context = lowering_context_of(result)
        with phase(f"lowering for the {target} target"):
            lowered = lower(model, target, lowered_layers, context=lowering_context, dump_dir=dump_dir,
                            first_index=len(result.pass_manager.records) + 1)
        del model
        release_freed_memory()  # the exporter's model, replaced by the lowered one
        with writing_into(output_dir):  # a full disk while writing is one line naming the artifact
            written = write_and_check(lowered, target, lowered_layers, lowering_context, staging,
                                      verify_fusion=result.context.config.verify_fusion,
                                      integer_attention=attention_layers(result))
            files, fusion = written.files, written.fusion
            with phase("checking ONNX Runtime's numerics against the torch graph"):
                numerics = check_numerics(staging / MODEL_FILE, result)
                for group in range(len(lowered.group_models)):  # each group's own model on its own inputs
                    check_numerics(staging / group_model_file(group), result, only_group=group)
            compile_log = {"compile_seconds": round(clock.elapsed(), 2),
                           "phases": clock.to_log(),
                           "passes": [{"name": r.name, "seconds": round(r.seconds, 3)}
                                      for r in result.pass_manager.records]}
            lowering = {**written.lowering, "passes": [pass_record(r) for r in lowered.records]}
            compile_log["lowering"] = [{"name": r.name, "seconds": round(r.seconds, 3)} for r in lowered.records]
            manifest = build_manifest(result, fusion, files)
            reconstruction, reconstruction_log = reconstruction_records(result.pass_manager.passes)
            if reconstruction is not None:  # errors in the manifest; time and peak memory in the compile log
                manifest["reconstruction"] = {**manifest["reconstruction"], "report": reconstruction}
                compile_log["reconstruction"] = reconstruction_log
            manifest["layers"] = {key: record.to_manifest() for key, record in lowered_layers.items()}
            write_manifest(staging, {**manifest, "lowering": lowering, "numerics": numerics_manifest(numerics)},
                           compile_log)
    return Artifact.load(output_dir), result


@dataclass
class WrittenModel:
    """What :func:`write_and_check` did: the files it wrote, ONNX Runtime's fusion record for the manifest and
    its full report (both None where not checked), and the manifest's ``lowering`` fields (without the pass
    records)."""

    files: list[str]
    fusion: dict | None
    report: object | None
    lowering: dict


def write_and_check(lowered, target: str, layers: dict, lowering_context, directory: Path, *,
                    verify_fusion: bool = True, integer_attention: list[str] = (),
                    refuse_unfused: bool = True, model_file: str = MODEL_FILE) -> WrittenModel:
    """The tail every producer of an artifact model shares (compile, ``ditq lower``, ``ditq inspect``): write the
    lowered model (and its per-group models) into ``directory``, and check in ONNX Runtime's optimized graph
    that every quantized layer, every integer attention call and every fused attention node runs as lowered. A
    model that would not run quantized is refused here (``refuse_unfused=False``: reported, for ``inspect``)."""
    from .exporters import fusion_report, save_onnx
    from .exporters.ort_inspect import INTEGER_ATTENTION_OPS, attention_kernels
    from .progress import phase

    with phase("writing the artifact"):
        files = save_onnx(lowered.model, directory / model_file)
        files += save_group_models(lowered.group_models, directory)
    fusion = report = None
    if verify_fusion and target != "tensorrt":  # TensorRT builds its own kernels
        with phase("checking ONNX Runtime's fusion"):
            report = fusion_report(directory / model_file, layers)
        if report.unfused and refuse_unfused:
            raise DitqError(
                f"ONNX Runtime did not fuse {len(report.unfused)} quantized layers into int8 kernels "
                f"(e.g. {next(iter(report.unfused.items()))}); the artifact would not run quantized"
            )
        fusion = report.to_manifest()
        if integer_attention:
            kernels = attention_kernels(directory / model_file, list(integer_attention))
            unfused = {layer: k for layer, k in kernels.items() if not set(k.values()) <= INTEGER_ATTENTION_OPS}
            if unfused and refuse_unfused:
                raise DitqError(f"ONNX Runtime did not run {len(unfused)} quantized attention calls on integer "
                                f"kernels (e.g. {next(iter(unfused.items()))}); the artifact would not run "
                                "quantized")
            fusion["attention"] = {"layers": len(kernels),
                                   "kernels": dict(Counter(op for k in kernels.values() for op in k.values()))}
        fused = fused_attention_record(report, lowering_context.notes, refuse=refuse_unfused)
        if fused:
            fusion["attention"] = fused
    return WrittenModel(files, fusion, report, lowering_manifest(target, lowered, lowering_context))


def pass_record(record) -> dict:
    """A pass's record as manifests keep it."""
    return {"name": record.name, "modified": record.modified, "summary": record.summary}


def fused_attention_record(report, notes: dict, refuse: bool = True) -> dict | None:
    """Where the lowering fused float attention into ``MultiHeadAttention`` (``notes["fused_attention"]``, the
    count it wrote), ONNX Runtime's optimized graph (``report``, a ``FusionReport``) must run as many (with
    ``refuse=False``, for inspect, the count ONNX Runtime ran is recorded instead); the manifest's record of them,
    or None where nothing was fused."""
    fused = notes.get("fused_attention", 0)
    if not fused:
        return None
    ran = report.op_counts.get("MultiHeadAttention", 0)
    if ran != fused and refuse:
        raise DitqError(f"ONNX Runtime's optimized graph runs {ran} MultiHeadAttention kernels where the lowering "
                        f"wrote {fused}; the artifact would not run as lowered")
    return {"nodes": fused, "kernels": {"MultiHeadAttention": ran}}


def attention_layers(result: CompileResult) -> list[str]:
    """The attention layers Q/DQ insertion made integer (from its provenance)."""
    gm = graph_modules(result.graph_module)[0]
    return list(dict.fromkeys(n.meta[PROVENANCE_KEY]["layer"] for n in gm.graph.nodes
                              if n.meta.get(PROVENANCE_KEY, {}).get("role") == "attention_output"))


def lowering_context_of(result: CompileResult):
    """What lowering may use beyond the model: the model config, the timestep groups, and up to four
    recorded calibration inputs per group spread over its timesteps (the CUDA target measures float16
    ranges on them)."""
    from .exporters.lowering import LoweringContext

    ctx = result.context
    probe: dict[int, list[tuple]] = {}
    for group in ctx.timestep_groups:
        timesteps = sorted(t for t in ctx.calibration_inputs if group.contains(t))
        picks = sorted({timesteps[round(i * (len(timesteps) - 1) / 3)] for i in range(4)}) if timesteps else []
        probe[group.index] = [tuple(t.numpy() for t in ctx.calibration_inputs[t]) for t in picks]
    return LoweringContext(probe_inputs=probe)


def lowering_manifest(target: str, lowered, lowering_context) -> dict:
    """The manifest's ``lowering`` fields (besides the passes): the target, its provider, what happened to
    activation quantization, the per-group model files, and what the passes decided."""
    from .artifact import group_model_file
    from .config import TARGETS

    spec = TARGETS[target]
    activation = {"as-format": "as the format says (uint8 affine per tensor for integer formats)",
                  "none": "not applied: the CUDA provider has no integer GEMM for Q/DQ graphs; layers are "
                          "weight-only MatMulNBits on float16 activations",
                  "symmetric": "int8 symmetric per tensor (zero point 0), or FP8 E4M3"}[spec.activations]
    return {"target": target, "provider": spec.provider, "activation_quantization": activation,
            "group_models": [group_model_file(g) for g in range(len(lowered.group_models))],
            "notes": lowering_context.notes}


def save_group_models(models: list, directory: Path) -> list[str]:
    """Write one model per timestep group (the TensorRT target) beside model.onnx; returns the files."""
    from .artifact import group_model_file
    from .exporters import save_onnx

    files: list[str] = []
    for group, group_model in enumerate(models):
        files += save_onnx(group_model, directory / group_model_file(group))
    return files


def check_numerics(model_path: Path, result: CompileResult, only_group: int | None = None):
    """ONNX Runtime against the torch fake-quant graph on recorded calibration inputs, per timestep group;
    an artifact that disagrees is refused. The tolerance is ``ditq_compiler.numerics``'s (same integer
    arithmetic); on the CUDA target its floor is raised to the float16 one (``lowering/cuda.py``), which the
    report keeps as ``float16_floor``. ``only_group``: check a per-group model file on its own group's inputs."""
    from .exporters.lowering.cuda import FLOAT16_MAX_ERROR_TOLERANCE, FLOAT16_REL_L2_TOLERANCE
    from .numerics import Agreement, check_against_torch
    from .runtime import create_session

    config = result.context.config
    fp8_qdq = config.target == "tensorrt" and any(r.weight_format.startswith("float8") for r in result.layers.values())
    session = create_session(model_path, "cpu", weight_range=config.weight_range, fp8_qdq=fp8_qdq)
    inputs = result.context.check_inputs_by_group(per_group=None)  # the check spreads up to 8 rows per group
    if only_group is not None:
        inputs = {only_group: inputs.get(only_group, [])}
    report = check_against_torch(session, result.graph_module, inputs, result.context.signature)
    floor = Agreement(FLOAT16_REL_L2_TOLERANCE, FLOAT16_MAX_ERROR_TOLERANCE) if config.target == "cuda" else None
    report.float16_floor = floor

    def tolerance(check) -> Agreement:
        if floor is None:
            return check.tolerance
        return Agreement(max(check.tolerance.rel_l2, floor.rel_l2), max(check.tolerance.max_error, floor.max_error))

    failing = {g: c for g, c in report.per_group.items() if not c.agreement.within(tolerance(c))}
    if failing:
        group, worst = max(failing.items(), key=lambda item: item[1].agreement.rel_l2)
        hint = ""
        if config.weight_range == "full":
            hint = "; this CPU's int8 kernels may saturate full-range weights: try --weight-range reduced"
        raise DitqError(f"ONNX Runtime's output differs from the torch fake-quant graph in timestep group {group} "
                        f"({worst.agreement.describe()}, against {worst.sensitivity.rel_l2:.1e} from rounding noise "
                        f"alone); the artifact would not compute what was calibrated{hint}")
    return report


def numerics_manifest(report) -> dict:
    """The report as the manifest keeps it, with the CUDA target's float16 floor when there is one."""
    record = report.to_manifest()
    floor = getattr(report, "float16_floor", None)
    if floor is not None:
        record["float16_floor"] = {"relative_l2": floor.rel_l2, "max_error": floor.max_error}
    return record


def _jsonable(config) -> dict:
    """A config as strict JSON: tuples as lists, other objects and non-finite floats (DPM-Solver's
    ``lambda_min_clipped = -inf``) as strings (``sampling.make_scheduler`` reads them back)."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.loads(json.dumps(finite(dict(config)), default=str))
