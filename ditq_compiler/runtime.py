"""Run artifacts in ONNX Runtime: provider selection and the denoiser call."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .errors import ConfigError

PROVIDERS = ("auto", "cuda", "cpu")
_CUDA_LIBRARIES = ("libcuda.so.1", "libcudart.so.13", "libcublasLt.so.13", "libcudnn.so.9")


def cuda_usable() -> tuple[bool, str]:
    """Whether the CUDA provider can start here, and if not, why."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    for library in _CUDA_LIBRARIES:
        try:
            ctypes.CDLL(library)
        except OSError:
            return False, f"{library} is not loadable (the CUDA provider needs CUDA 13 and cuDNN 9)"
    return True, ""


def create_session(model_path: str | Path, provider: str = "auto", threads: int | None = None):
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if provider in ("auto", "cuda"):
        usable, why = cuda_usable()
        if usable:
            session = ort.InferenceSession(str(model_path), options,
                                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if session.get_providers()[0] == "CUDAExecutionProvider":
                return session
            why = "onnxruntime could not start the CUDA provider"
        if provider == "cuda":
            raise ConfigError(f"--provider cuda: {why}; use --provider cpu or auto")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def run_denoiser(session, sample: np.ndarray, timestep: np.ndarray, class_labels: np.ndarray) -> np.ndarray:
    feeds = {
        "sample": np.ascontiguousarray(sample, dtype=np.float32),
        "timestep": np.ascontiguousarray(timestep, dtype=np.int64),
        "class_labels": np.ascontiguousarray(class_labels, dtype=np.int64),
    }
    return session.run(["out"], feeds)[0]
