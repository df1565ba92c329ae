"""The artifact: a directory holding ``model.onnx`` (+ external data over 2 GB) and ``manifest.json``.

Writing is atomic: everything is written into a hidden sibling directory, and only a complete
directory is renamed into place; a failed compile leaves no artifact and never overwrites a good one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import ArtifactError
from .sampling import check_timesteps, sample as run_sampling

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"


@contextmanager
def staging_directory(destination: str | Path) -> Iterator[Path]:
    """Yield an empty directory; on success it replaces ``destination``, on failure it is removed."""
    destination = Path(destination).resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists() and not destination.is_dir():
        raise ArtifactError(f"{destination} exists and is not a directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield staging
        for file in staging.iterdir():  # flush file contents before the rename makes them visible
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        backup = None
        if destination.exists():
            backup = destination.parent / f".{destination.name}.old-{staging.name.rsplit('-', 1)[-1]}"
            os.rename(destination, backup)
        os.rename(staging, destination)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class Artifact:
    """A compiled artifact, loaded from its directory."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._sessions: dict[str, object] = {}

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        manifest_file = path / MANIFEST_FILE
        if not path.is_dir():
            raise ArtifactError(f"artifact directory not found: {path}")
        if not manifest_file.is_file() or not (path / MODEL_FILE).is_file():
            raise ArtifactError(f"{path} is not a ditq artifact (needs {MODEL_FILE} and {MANIFEST_FILE})")
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"cannot read {manifest_file}: {exc}") from None
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{path}: artifact format version {version}, this ditq reads {FORMAT_VERSION}")
        return cls(path, manifest)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def model_config(self) -> dict:
        return self.manifest["model"]["config"]

    @property
    def scheduler_config(self) -> dict:
        return self.manifest["scheduler"]

    def session(self, provider: str = "auto", threads: int | None = None):
        key = f"{provider}:{threads}"
        if key not in self._sessions:
            from .runtime import create_session

            self._sessions[key] = create_session(self.model_path, provider, threads)
        return self._sessions[key]

    def denoise(self, sample, timestep, class_labels, provider: str = "auto") -> np.ndarray:
        """One call of the denoiser: the diffusers model's ``.sample`` for these inputs."""
        from .runtime import run_denoiser

        timestep_tensor = torch.as_tensor(np.asarray(timestep, dtype=np.int64))
        check_timesteps(timestep_tensor, int(self.scheduler_config.get("num_train_timesteps", 1000)))
        return run_denoiser(self.session(provider), np.asarray(sample), timestep_tensor.numpy(),
                            np.asarray(class_labels))

    def sample(self, class_labels: list[int], *, steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
               provider: str = "auto", progress: bool = False) -> torch.Tensor:
        def denoise(x, t, y):
            return torch.from_numpy(self.denoise(x.numpy(), t, y.numpy(), provider=provider))

        return run_sampling(denoise, self.scheduler_config, self.model_config, list(class_labels), steps=steps,
                            guidance_scale=guidance_scale, seed=seed, progress=progress)
