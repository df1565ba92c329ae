"""The artifact: a directory holding ``model.onnx`` (+ external data over 2 GB), ``manifest.json`` and
``compile_log.json``.

* Writing is atomic and never loses a user's files: see :mod:`ditq_compiler.staging`.
* The manifest holds the sha256 of every model file and a seal over itself; loading checks both (see
  :mod:`ditq_compiler.integrity`), so a flipped byte is an error, not wrong images.
* ``compile_log.json`` holds what differs between two identical compiles (wall-clock times). It is
  listed in the manifest as unhashed and nothing reads it back, so the hashed files of two compiles of
  the same checkpoint, options and seed are byte-identical.
* A tensorrt-target artifact with timestep groups also holds one model per group, ``model.group<g>.onnx``
  (TensorRT cannot take ``model.onnx``'s ``If`` dispatch): on the TensorRT provider, :meth:`Artifact.denoise`
  computes each row's group from its timestep and runs that group's model on the group's rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import ArtifactError
from .integrity import (COMPILE_LOG_FILE, FORMAT_VERSION, MANIFEST_FILE, MODEL_FILE, file_records,
                        group_model_file, manifest_text, parse_manifest, verify_files)
from .limits import DEFAULT_TRAIN_TIMESTEPS, check_guidance_scale, check_seed, check_steps
from .sampling import sample as run_sampling
from .staging import check_output_dir, recover_interrupted_replace, staging_directory

__all__ = ["Artifact", "COMPILE_LOG_FILE", "FORMAT_VERSION", "MANIFEST_FILE", "MODEL_FILE", "check_output_dir",
           "group_model_file", "staging_directory", "write_manifest"]

# A manifest is a few kB; refusing a huge one keeps a corrupt or hostile file from filling memory.
_MAX_MANIFEST_BYTES = 64 << 20


def write_manifest(directory: Path, manifest: dict, compile_log: dict | None = None) -> dict:
    """Hash the files ``manifest["files"]`` names, seal the manifest and write it (last: a directory with
    a manifest is complete), with ``compile_log`` beside it, unhashed. Returns the manifest as written."""
    directory = Path(directory)
    unhashed = [COMPILE_LOG_FILE] if compile_log is not None else []
    full = {**manifest, "format_version": FORMAT_VERSION, "unhashed_files": unhashed,
            "integrity": {"algorithm": "sha256", "files": file_records(directory, list(manifest["files"]))}}
    if compile_log is not None:
        (directory / COMPILE_LOG_FILE).write_text(json.dumps(compile_log, indent=2) + "\n")
    text = manifest_text(full)
    (directory / MANIFEST_FILE).write_text(text)
    return json.loads(text)


class Artifact:
    """A compiled artifact, loaded from its directory and checked against its manifest."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._sessions: dict[str, object] = {}
        # Where the TensorRT provider keeps its engines: a directory beside the artifact unless set.
        self.tensorrt_cache: Path | None = None

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> "Artifact":
        """Read and check the manifest; with ``verify`` (the default) also hash every file against it."""
        path = Path(path)
        if not path.is_dir():
            recover_interrupted_replace(path.absolute())  # a replacement killed half way (fallback path only)
        if not path.is_dir():
            raise ArtifactError(f"artifact directory not found: {path}")
        manifest_file = path / MANIFEST_FILE
        if not manifest_file.is_file() or not (path / MODEL_FILE).is_file():
            raise ArtifactError(f"{path} is not a ditq artifact (needs {MODEL_FILE} and {MANIFEST_FILE})")
        artifact = cls(path, parse_manifest(_read_manifest_bytes(manifest_file), str(manifest_file)))
        if verify:
            artifact.verify()
        return artifact

    def verify(self) -> None:
        """Raise an ArtifactError naming the first file that differs from the manifest."""
        verify_files(self.path, self.manifest)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def model_config(self) -> dict:
        return self.manifest["model"]["config"]

    @property
    def scheduler_config(self) -> dict:
        return self.manifest["scheduler"]

    @property
    def family(self):
        """The model family adapter of the artifact's model class."""
        from .families import family_for

        return family_for(str(self.manifest["model"]["class"]))

    @property
    def signature(self):
        """The denoiser's inputs and output as the manifest records them (the compile's decision, carried as
        data); for an artifact whose manifest predates input roles, the family's signature of its config."""
        from .families import Signature

        inputs, outputs = self.manifest.get("inputs"), self.manifest.get("outputs")
        if isinstance(inputs, dict) and isinstance(outputs, dict) and len(outputs) == 1 and inputs and \
                all(isinstance(record, dict) and "role" in record for record in inputs.values()):
            return Signature.from_manifest(inputs, outputs)
        return self.family.signature(self.model_config)

    @property
    def timestep_domain(self):
        """The timesteps the artifact takes, as its manifest records them (the family's, for older manifests)."""
        from .families import TimestepDomain

        recorded = self.manifest.get("timestep_domain")
        if isinstance(recorded, dict):
            return TimestepDomain(str(recorded["kind"]), str(recorded["dtype"]), recorded["low"], recorded["high"])
        return self.family.timestep_domain(self.scheduler_config)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", DEFAULT_TRAIN_TIMESTEPS))

    @property
    def compile_log(self) -> dict:
        """Wall-clock times of the compile (``compile_seconds``, per pass). Unhashed, informative only:
        an unreadable log is an empty dict, never an error."""
        try:
            log = json.loads((self.path / COMPILE_LOG_FILE).read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return log if isinstance(log, dict) else {}

    @property
    def weight_range(self) -> str:
        """The int8 weight range the artifact was compiled with (``full`` needs VNNI/AMX for full speed)."""
        return str(self.manifest.get("weight_range", "full"))

    @property
    def target(self) -> str:
        """The provider family the artifact was lowered for (cpu, cuda, tensorrt); older artifacts: cpu."""
        return str(self.manifest.get("target", "cpu"))

    @property
    def group_model_paths(self) -> list[Path]:
        """The per-timestep-group model files (tensorrt target with several groups), else empty."""
        lowering = self.manifest.get("lowering")
        names = lowering.get("group_models", []) if isinstance(lowering, dict) else []
        return [self.path / name for name in names]

    def provider_choice(self, provider: str = "auto"):
        """The provider ``provider`` resolves to for this artifact, and the line to tell the user, if any."""
        from .runtime import resolve_provider

        return resolve_provider(provider, self.target)

    def session(self, provider: str = "auto", threads: int | None = None, model_path: Path | None = None):
        model_path = model_path or self.model_path
        key = f"{provider}:{threads}:{model_path.name}"
        if key not in self._sessions:
            from .runtime import create_session, tensorrt_provider_options

            cache = self.tensorrt_cache or self.path.with_name(self.path.name + ".trt-cache")
            options = tensorrt_provider_options(cache, int8=self._has_int8_quantizers())
            self._sessions[key] = create_session(model_path, provider, threads, weight_range=self.weight_range,
                                                 target=self.target, tensorrt_options=options,
                                                 fp8_qdq=self.target == "tensorrt" and self.has_fp8_layers())
        return self._sessions[key]

    def has_fp8_layers(self) -> bool:
        layers = self.manifest.get("layers")
        return isinstance(layers, dict) and any(isinstance(r, dict) and str(r.get("weight_format", "")).startswith(
            "float8") for r in layers.values())

    def _has_int8_quantizers(self) -> bool:
        layers = self.manifest.get("layers")
        formats = {str(r.get("weight_format", "")) for r in layers.values() if isinstance(r, dict)} \
            if isinstance(layers, dict) else set()
        return not formats or any(not f.startswith("float8") for f in formats)

    def denoise(self, *inputs, provider: str = "auto") -> np.ndarray:
        """One call of the denoiser on its inputs in signature order (DiT: ``sample, timestep, class_labels``):
        the diffusers model's ``.sample`` for these inputs."""
        from .runtime import run_denoiser

        signature = self.signature
        timestep_at = signature.index("timestep")
        domain = self.timestep_domain
        timesteps = np.asarray(inputs[timestep_at], dtype=domain.dtype)
        domain.check(torch.as_tensor(timesteps))
        inputs = tuple(np.asarray(value) if position != timestep_at else timesteps
                       for position, value in enumerate(inputs))
        groups = self.group_model_paths
        if groups and self.provider_choice(provider).provider == "tensorrt":
            return self.denoise_by_group(groups, inputs, provider)
        return run_denoiser(self.session(provider), signature, inputs)

    def denoise_by_group(self, paths: list[Path], inputs: tuple, provider: str) -> np.ndarray:
        """Rows grouped by timestep group (the manifest's ``timestep_groups``), each group's model run on its
        rows, results put back in row order: what ``model.onnx``'s If dispatch computes."""
        from .runtime import run_denoiser

        signature = self.signature
        timesteps = inputs[signature.index("timestep")]
        ends = np.asarray([g["end"] for g in self.manifest["timestep_groups"]], dtype=timesteps.dtype)
        row_group = np.searchsorted(ends, timesteps, side="left")
        out = None
        for group in np.unique(row_group):
            rows = np.nonzero(row_group == group)[0]
            result = run_denoiser(self.session(provider, model_path=paths[int(group)]), signature,
                                  signature.rows(inputs, rows))
            if out is None:
                out = np.empty((len(timesteps), *result.shape[1:]), dtype=result.dtype)
            out[rows] = result
        return out

    def sample(self, conditions: list, *, steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
               provider: str = "auto", progress: bool = False) -> torch.Tensor:
        """Run the sampling loop; numeric options are checked first, and samples that came out NaN or
        inf are an error rather than a file of garbage."""
        steps = check_steps(steps, "--steps", self.num_train_timesteps)
        guidance_scale = check_guidance_scale(guidance_scale)
        seed = check_seed(seed)

        def denoise(*inputs):
            return torch.from_numpy(self.denoise(*inputs, provider=provider))

        samples = run_sampling(self.family, denoise, self.scheduler_config, self.model_config, list(conditions),
                               steps=steps,
                               guidance_scale=guidance_scale, seed=seed, progress=progress)
        if not bool(torch.isfinite(samples).all()):
            raise ArtifactError(f"sampling {self.path} produced NaN or inf (guidance scale {guidance_scale:g}, "
                                f"{steps} steps); try a lower --guidance-scale, or recompile the artifact")
        return samples


def _read_manifest_bytes(manifest_file: Path) -> bytes:
    try:
        with open(manifest_file, "rb") as handle:
            data = handle.read(_MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ArtifactError(f"cannot read {manifest_file}: {exc.strerror}") from None
    if len(data) > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{manifest_file} is larger than {_MAX_MANIFEST_BYTES >> 20} MB; it is no ditq "
                            "manifest: recompile the artifact")
    return data
