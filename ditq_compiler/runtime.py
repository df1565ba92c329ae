"""Run artifacts in ONNX Runtime: provider selection and the denoiser call.

Providers (``--provider``): ``cpu``, ``cuda``, ``tensorrt``, or ``auto``, which picks the provider the
artifact was lowered for (its ``target``) when that provider can start here, and otherwise the next one
that can (TensorRT -> CUDA -> CPU), saying why. Running an artifact on another provider than its target's
works but costs speed, and :func:`resolve_provider` returns one line that says so:

* a cpu-target artifact on CUDA or TensorRT: its uint8 Q/DQ has no integer kernel on CUDA (ONNX Runtime
  runs dequantize + a float MatMul, slower than float16) and TensorRT's parser refuses uint8 zero points
  (the nodes fall back to CUDA): re-lower it with ``ditq lower ART --target cuda|tensorrt``;
* a cuda-target artifact on the CPU: it runs (``MatMulNBits`` and ``MultiHeadAttention`` have CPU kernels),
  but float16 has no fast CPU kernels (ONNX Runtime casts around most ops): for a CPU, compile or lower with
  ``--target cpu``; on TensorRT its ``com.microsoft`` ops fall back to CUDA;
* a tensorrt-target artifact on CUDA or the CPU: its int8 Q/DQ runs as dequantize + float kernels.

TensorRT's libraries come from pip (``pip install -e '.[tensorrt]'``: ``tensorrt-cu13-libs`` 10.x, which
ONNX Runtime 1.31's provider links against as ``libnvinfer.so.10``). ONNX Runtime finds them only on the
loader's path, so :func:`preload_gpu_libraries` loads them first from the ``tensorrt_libs`` package with
``RTLD_GLOBAL`` (and CUDA/cuDNN from the NVIDIA pip packages with ``onnxruntime.preload_dlls()``); no
``LD_LIBRARY_PATH`` is needed inside ditq.

ONNX Runtime's own exceptions (``Fail``, ``InvalidProtobuf``, ``InvalidArgument``, ...) derive from
nothing of ours; they are turned into one-line :class:`ArtifactError`s here, so a model file that ORT
refuses is a clear error, never a traceback.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArtifactError, ConfigError

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}
_CUDA_LIBRARIES = ("libcuda.so.1", "libcudart.so.13", "libcublasLt.so.13", "libcudnn.so.9")
# ONNX Runtime 1.31's TensorRT provider links these (readelf -d libonnxruntime_providers_tensorrt.so)
_TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")
_FALLBACK = {"tensorrt": "cuda", "cuda": "cpu"}
_MISMATCH = {
    ("cpu", "cuda"): "a cpu-target artifact has uint8 Q/DQ, which ONNX Runtime's CUDA provider runs as dequantize + "
                     "float MatMul (slower than float16): re-lower it with `ditq lower ART --target cuda`",
    ("cpu", "tensorrt"): "a cpu-target artifact has uint8 zero points and com.microsoft ops, which TensorRT refuses "
                         "(those nodes fall back to CUDA): re-lower it with `ditq lower ART --target tensorrt`",
    ("cuda", "cpu"): "a cuda-target artifact runs on the CPU (MatMulNBits and MultiHeadAttention have CPU kernels) "
                     "but its float16 is slow there: for a CPU, compile or lower it with --target cpu",
    ("cuda", "tensorrt"): "a cuda-target artifact's com.microsoft ops (MatMulNBits, MultiHeadAttention) are not "
                          "TensorRT's: those nodes run on CUDA; use --provider cuda",
    ("tensorrt", "cpu"): "a tensorrt-target artifact's int8 Q/DQ runs on the CPU as dequantize + float kernels (not "
                         "fused: a cpu-target artifact is faster there)",
    ("tensorrt", "cuda"): "a tensorrt-target artifact's int8 Q/DQ runs on CUDA as dequantize + float kernels "
                          "(slower than a cuda-target artifact's float16)",
}


@dataclass(frozen=True)
class ProviderChoice:
    """The provider an artifact runs on, and one line for the user when it is not the target's own."""

    provider: str  # cpu | cuda | tensorrt
    note: str = ""


def resolve_provider(requested: str, target: str = "cpu") -> ProviderChoice:
    """``--provider`` for an artifact lowered for ``target``: ``auto`` is the target's provider, or the next
    usable one (TensorRT -> CUDA -> CPU) with the reason; an explicit provider that is not usable here is an
    error; a provider other than the target's gets the line saying what it costs."""
    if requested not in PROVIDERS:
        raise ConfigError(f"unknown provider {requested!r}; choose one of {', '.join(PROVIDERS)}")
    if requested == "auto":
        provider, reasons = target, []
        while True:
            usable, why = provider_usable(provider)
            if usable:
                break
            reasons.append(f"{provider}: {why}")
            provider = _FALLBACK[provider]
        note = f"--provider auto: running on {provider} ({'; '.join(reasons)})" if reasons else ""
        mismatch = _MISMATCH.get((target, provider))
        return ProviderChoice(provider, "; ".join(filter(None, [note, mismatch])))
    usable, why = provider_usable(requested)
    if not usable:
        raise ConfigError(f"--provider {requested}: {why}; use --provider cpu or auto")
    return ProviderChoice(requested, _MISMATCH.get((target, requested), ""))


def provider_usable(provider: str) -> tuple[bool, str]:
    if provider == "cpu":
        return True, ""
    if provider == "cuda":
        return cuda_usable()
    return tensorrt_usable()


def preload_gpu_libraries() -> None:
    """Load CUDA/cuDNN from NVIDIA's pip packages (``onnxruntime.preload_dlls``) and TensorRT from the
    ``tensorrt_libs`` package, with ``RTLD_GLOBAL``, so that ONNX Runtime's providers find them. Loading what
    is not installed is skipped: the usability checks then say what is missing."""
    import contextlib
    import io

    import onnxruntime as ort

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints install advice when nothing is found
            ort.preload_dlls(directory="")
    except Exception:  # noqa: BLE001  (no NVIDIA pip packages: the system's libraries, if any, are used)
        pass
    spec = importlib.util.find_spec("tensorrt_libs")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for library in _TENSORRT_LIBRARIES:
            path = Path(location) / library
            if path.is_file():
                try:
                    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass


def tensorrt_usable() -> tuple[bool, str]:
    """Whether the TensorRT provider can start here, and if not, why."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no TensorRT provider (install onnxruntime-gpu)"
    usable, why = cuda_usable()
    if not usable:
        return False, why
    preload_gpu_libraries()
    for library in _TENSORRT_LIBRARIES[::2]:
        try:
            ctypes.CDLL(library)
        except OSError:
            return False, (f"{library} is not loadable (TensorRT 10's libraries: pip install -e '.[tensorrt]', "
                           "or put them on LD_LIBRARY_PATH)")
    return True, ""


def cuda_usable() -> tuple[bool, str]:
    """Whether the CUDA provider can start here, and if not, why."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    preload_gpu_libraries()
    for library in _CUDA_LIBRARIES:
        try:
            ctypes.CDLL(library)
        except OSError:
            return False, f"{library} is not loadable (the CUDA provider needs CUDA 13 and cuDNN 9)"
    return True, ""


def create_session(model_path: str | Path, provider: str = "auto", threads: int | None = None, *,
                   weight_range: str = "reduced", target: str = "cpu", tensorrt_options: dict | None = None,
                   fp8_qdq: bool = False):
    """An ONNX Runtime session for an artifact's model. ``provider`` as :func:`resolve_provider` takes it
    (``auto``: the one matching the artifact's ``target``). ``weight_range`` is the artifact's int8 weight
    range: full-range weights on a CPU whose u8 x s8 kernels saturate run in ONNX Runtime's exact U8U8 mode
    (see :mod:`ditq_compiler.cpu`). ``tensorrt_options``: the TensorRT provider's options
    (:func:`tensorrt_provider_options`). ``fp8_qdq``: the model keeps FP8 weight Q/DQ (tensorrt target), which
    ONNX Runtime's QDQ fusion mis-fuses into MatMulIntegerToFloat and then refuses to load (see
    ``lowering/cpu.py``); outside TensorRT those Q/DQ nodes then run unfused (``session.disable_quant_qdq``)."""
    from .cpu import saturation_safe_options

    choice = resolve_provider(provider, target)
    options = quiet_session_options()
    if threads:
        options.intra_op_num_threads = threads
    saturation_safe_options(options, weight_range)
    if fp8_qdq and choice.provider != "tensorrt":
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if choice.provider == "cpu":
        return _open(model_path, options, ["CPUExecutionProvider"])
    providers: list = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice.provider == "tensorrt":
        providers.insert(0, ("TensorrtExecutionProvider", tensorrt_options or {}))
    session = _open(model_path, options, providers)
    if session.get_providers()[0] != ORT_PROVIDERS[choice.provider]:
        raise ConfigError(f"--provider {choice.provider}: onnxruntime could not start the "
                          f"{ORT_PROVIDERS[choice.provider]}; use --provider cpu or auto")
    return session


def tensorrt_provider_options(cache_dir: str | Path, *, int8: bool, fp16: bool = True) -> dict:
    """The TensorRT provider's options for an artifact: engines and timing caches kept in ``cache_dir``
    (building an engine takes minutes; a cached one loads in seconds), float16 kernels allowed, int8 allowed
    when the artifact has int8 Q/DQ (TensorRT takes the scales from the Q/DQ nodes: no calibration table).
    FP8 Q/DQ needs no flag: TensorRT takes its precision from the Q/DQ types."""
    return {
        "trt_fp16_enable": fp16,
        "trt_int8_enable": int8,
        "trt_int8_use_native_calibration_table": False,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
    }


def quiet_onnxruntime_logging() -> None:
    """ONNX Runtime's default logger to errors only. A session's graph transformers log through it (e.g.
    "UnsqueezeElimination cannot remove node", a warning on every PixArt export), and a session's own
    ``log_severity_level`` does not reach it."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)


def quiet_session_options():
    """``onnxruntime.SessionOptions`` that log errors only (:func:`quiet_onnxruntime_logging`)."""
    import onnxruntime as ort

    quiet_onnxruntime_logging()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


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


def run_denoiser(session, signature, inputs) -> np.ndarray:
    """One denoiser call: ``inputs`` in the signature's order (a ``families.Signature``)."""
    feeds = signature.feeds(inputs)
    try:
        return session.run([signature.output], feeds)[0]
    except Exception as exc:
        if not _is_onnxruntime_error(exc):
            raise
        raise ArtifactError(f"ONNX Runtime failed running the denoiser: {_first_line(exc)}") from None
