"""``ditq lower ART --target X -o ART2``: re-lower an artifact for another target, without recalibrating.

1. Load and verify ``ART``; its manifest lists the lowering passes that made ``model.onnx`` and each layer's
   record (which tensor its kernel reads, in which format).
2. Raise ``model.onnx`` to the canonical form the fx exporter writes: the inverse of each of those passes, in
   reverse order (``exporters/lowering/canonical.py``). Every CPU pass has an inverse, so a cpu-target
   artifact can be re-lowered; the CUDA lowering drops the activation quantizers and rounds to float16, so a
   cuda-target artifact cannot (recompile it).
3. Lower the canonical model for ``X`` (``exporters/lowering/<X>.py``). Activation parameters convert from
   the Q/DQ scale and zero point alone (see ``tensorrt.py``); for ``cuda`` they are dropped. Both change the
   numerics, which the new manifest says; lowering for the artifact's own target gives the same model back.
4. Measure the new artifact against the source artifact (ONNX Runtime, CPU) on denoiser inputs taken from a
   short sampling run of the source artifact, and write the new artifact atomically, with a manifest that
   records where it came from. Re-lowering to the same target must agree within ``numerics.py``'s tolerance;
   to another target the agreement is recorded, not enforced (the numerics changed on purpose).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .artifact import MODEL_FILE, Artifact, staging_directory, write_manifest
from .config import TARGETS
from .errors import ConfigError
from .staging import writing_into

# The probe run: a short trajectory of the source artifact (its calibration guidance and seed).
PROBE_STEPS = 8
PROBE_SAMPLES = 2
PROBE_PER_GROUP = 4


def relower(source: str | Path, target: str, output_dir: str | Path, *, force: bool = False,
            dump_dir: str | Path | None = None) -> Artifact:
    from .exporters.lowering import LayerRecord, LoweringContext, lower, raise_to_canonical
    from .pipeline import pass_record, write_and_check
    from .progress import phase

    import onnx

    if target not in TARGETS:
        raise ConfigError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    start = time.perf_counter()
    with phase("verifying the artifact"):
        artifact = Artifact.load(source)
    if artifact.family.calibrates_through_pipeline:  # the probe samples without a pipeline: refused before work
        raise ConfigError(f"re-lowering a {artifact.model_config.get('_class_name', 'text-to-image')} artifact is not "
                          "supported yet (its probe inputs come from the diffusers pipeline): recompile it from the "
                          f"pipeline with --target {target}")
    manifest = artifact.manifest
    layers = {key: LayerRecord.from_manifest(data) for key, data in _layers_of(manifest).items()}
    if target == "tensorrt" and any(r.weight_format.startswith("fp4") for r in layers.values()):
        raise ConfigError("--target tensorrt does not take fp4 layers (ditq's FP4 runs on int8 kernels with uint8 "
                          "activations); keep this artifact on the CPU")
    if target == "cuda" and any(r.weight_format.startswith("float8") for r in layers.values()):
        raise ConfigError("--target cuda does not take fp8 layers (no FP8 GEMM on ONNX Runtime's CUDA provider, "
                          "MatMulNBits takes int4/int8 weights); use --target tensorrt for FP8")
    # the output is reserved first: an -o that cannot be written is refused before the work (staging.py)
    with staging_directory(output_dir, force=force) as staging:
        recorded = [p["name"] for p in manifest.get("lowering", {}).get("passes", []) if isinstance(p, dict)]
        with phase("raising the model to the canonical form"):
            raised = raise_to_canonical(onnx.load(str(artifact.model_path)), recorded, layers, dump_dir=dump_dir)
        with phase("sampling a few steps of the source artifact (denoiser inputs)"):
            probe = probe_inputs(artifact)
        context = LoweringContext(probe_inputs=probe)
        with phase(f"lowering for the {target} target"):
            lowered = lower(raised.model, target, layers, context=context, dump_dir=dump_dir,
                            first_index=len(raised.records) + 1)
        with writing_into(output_dir):
            written = write_and_check(lowered, target, layers, context, staging)
            files, fusion = written.files, written.fusion
            with phase("comparing with the source artifact"):
                numerics = _agreement_with_source(artifact, staging / MODEL_FILE, target, probe)
            lowering = {**written.lowering,
                        "raised_from": {"target": artifact.target,
                                        "passes": [pass_record(r) for r in raised.records]},
                        "passes": [pass_record(r) for r in lowered.records]}
            new_manifest = {key: value for key, value in manifest.items()
                            if key not in ("integrity", "manifest_sha256", "unhashed_files")}
            new_manifest.update({
                "target": target, "files": files, "fusion": fusion, "lowering": lowering, "numerics": numerics,
                "layers": {key: record.to_manifest() for key, record in layers.items()},
                "quantized_weights": {key: record.weight for key, record in layers.items()},
                "relowered_from": {"path": str(artifact.path), "target": artifact.target,
                                   "manifest_sha256": manifest.get("manifest_sha256")},
            })
            compile_log = {"relower_seconds": round(time.perf_counter() - start, 2),
                           "lowering": [{"name": r.name, "seconds": round(r.seconds, 3)}
                                        for r in [*raised.records, *lowered.records]]}
            write_manifest(staging, new_manifest, compile_log)
    return Artifact.load(output_dir)


def _layers_of(manifest: dict) -> dict:
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        from .errors import ArtifactError

        raise ArtifactError("the artifact's manifest has no layer records (an older ditq wrote it); recompile it")
    return layers


def probe_inputs(artifact: Artifact) -> dict[int, list[tuple]]:
    """Denoiser inputs of a short sampling run of ``artifact`` (CPU provider), up to four per timestep group
    spread over the group's timesteps (what the CUDA target measures float16 ranges on)."""
    calibration = artifact.manifest.get("calibration", {})
    family = artifact.family
    conditions = family.spread_conditions(artifact.model_config, PROBE_SAMPLES)
    seed = int(calibration.get("seed", 0))
    guidance = float(calibration.get("guidance_scale", 4.0))
    timestep_at = artifact.signature.index("timestep")
    recorded: dict = {}

    def denoise(*inputs):
        arrays = tuple(np.asarray(value).copy() for value in inputs)
        recorded[arrays[timestep_at][0].item()] = arrays
        return torch.from_numpy(artifact.denoise(*arrays, provider="cpu"))

    steps = min(PROBE_STEPS, artifact.num_train_timesteps)
    for _ in family.iterate_sampling(denoise, artifact.scheduler_config, artifact.model_config, conditions,
                                     steps=steps, guidance_scale=guidance, seed=seed):
        pass
    probe: dict[int, list[tuple]] = {}
    for group in artifact.manifest["timestep_groups"]:
        timesteps = sorted(t for t in recorded if group["start"] <= t <= group["end"])
        if not timesteps:  # a group no sampled step fell in: one input at its middle timestep
            inputs = list(next(iter(recorded.values())))
            middle = (group["start"] + group["end"]) / 2
            timestep = inputs[timestep_at]
            inputs[timestep_at] = np.full(len(timestep), middle).astype(timestep.dtype)
            probe[int(group["index"])] = [tuple(inputs)]
            continue
        picks = sorted({timesteps[round(i * (len(timesteps) - 1) / (PROBE_PER_GROUP - 1))]
                        for i in range(PROBE_PER_GROUP)})
        probe[int(group["index"])] = [recorded[t] for t in picks]
    return probe


def _agreement_with_source(source: Artifact, model_path: Path, target: str, probe: dict) -> dict:
    from .errors import DitqError
    from .numerics import MAX_ERROR_TOLERANCE, REL_L2_TOLERANCE, agreement
    from .runtime import create_session, run_denoiser

    fp8_qdq = target == "tensorrt" and source.has_fp8_layers()
    session = create_session(model_path, "cpu", weight_range=source.weight_range, target=target, fp8_qdq=fp8_qdq)
    ours, theirs = [], []
    for batches in probe.values():
        for inputs in batches:
            ours.append(run_denoiser(session, source.signature, inputs))
            theirs.append(source.denoise(*inputs, provider="cpu"))
    match = agreement(np.concatenate(ours), np.concatenate(theirs))
    same_target = target == source.target
    if same_target and not match.ok:
        raise DitqError(f"re-lowering {source.path} for its own target changed its output ({match.describe()}); "
                        "a lowering pass and its inverse disagree")
    change = "activation quantizers dropped, float16 compute" if target == "cuda" else "activation parameters converted"
    return {"against": "source artifact (ONNX Runtime, CPU provider)", "relative_l2": float(f"{match.rel_l2:.3e}"),
            "max_error": float(f"{match.max_error:.3e}"), "enforced": same_target,
            "tolerance": {"relative_l2": REL_L2_TOLERANCE, "max_error": MAX_ERROR_TOLERANCE} if same_target else None,
            "why": "same target: must be the same model" if same_target else
            f"re-lowering from {source.target} to {target} changes the numerics on purpose ({change})"}
