"""Run artifacts in ONNX Runtime: provider selection and the denoiser call.

ONNX Runtime's own exceptions (``Fail``, ``InvalidProtobuf``, ``InvalidArgument``, ...) derive from
nothing of ours; they are turned into one-line :class:`ArtifactError`s here, so a model file that ORT
refuses is a clear error, never a traceback.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .errors import ArtifactError, ConfigError

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


def create_session(model_path: str | Path, provider: str = "auto", threads: int | None = None, *,
                   weight_range: str = "reduced"):
    """An ONNX Runtime session for an artifact's model. ``weight_range`` is the artifact's int8 weight range:
    full-range weights on a CPU whose u8 x s8 kernels saturate run in ONNX Runtime's exact U8U8 mode
    (see :mod:`ditq_compiler.cpu`)."""
    import onnxruntime as ort

    from .cpu import saturation_safe_options

    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    saturation_safe_options(options, weight_range)
    if provider in ("auto", "cuda"):
        usable, why = cuda_usable()
        if usable:
            session = _open(model_path, options, ["CUDAExecutionProvider", "CPUExecutionProvider"])
            if session.get_providers()[0] == "CUDAExecutionProvider":
                return session
            why = "onnxruntime could not start the CUDA provider"
        if provider == "cuda":
            raise ConfigError(f"--provider cuda: {why}; use --provider cpu or auto")
    return _open(model_path, options, ["CPUExecutionProvider"])


def _open(model_path: str | Path, options, providers: list[str]):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as exc:
        if not _is_onnxruntime_error(exc):
            raise
        raise ArtifactError(f"ONNX Runtime cannot load {model_path}: {_first_line(exc)}; "
                            "recompile the artifact") from None


def _is_onnxruntime_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("onnxruntime")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def run_denoiser(session, sample: np.ndarray, timestep: np.ndarray, class_labels: np.ndarray) -> np.ndarray:
    feeds = {
        "sample": np.ascontiguousarray(sample, dtype=np.float32),
        "timestep": np.ascontiguousarray(timestep, dtype=np.int64),
        "class_labels": np.ascontiguousarray(class_labels, dtype=np.int64),
    }
    try:
        return session.run(["out"], feeds)[0]
    except Exception as exc:
        if not _is_onnxruntime_error(exc):
            raise
        raise ArtifactError(f"ONNX Runtime failed running the denoiser: {_first_line(exc)}") from None
