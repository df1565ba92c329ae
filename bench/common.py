"""Helpers shared by the benchmark scripts: machine description, FP32 export, ORT quantize_static
baselines calibrated on the same trajectories as ditq, and latency measurement."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime as ort

    return (f"{os.cpu_count()}-core x86 CPU ({cpu}), {platform.system()}; onnxruntime {ort.__version__}, "
            f"torch {torch.__version__}")


def export_fp32(model: torch.nn.Module, path: Path) -> None:
    from ditq_compiler.exporters import export_onnx, save_onnx
    from ditq_compiler.tracing import example_inputs, trace_dit

    config = dict(model.config)
    gm = trace_dit(model, example_inputs(config))
    save_onnx(export_onnx(gm, config), path)


def trajectory_batches(model: torch.nn.Module, scheduler_config: dict, *, steps: int, samples: int,
                       guidance_scale: float, seed: int) -> list[dict[str, np.ndarray]]:
    """The denoiser inputs met along ditq's calibration trajectories (same labels, noise and steps)."""
    from ditq_compiler.passes.calibrate import calibration_labels
    from ditq_compiler.sampling import iterate_sampling

    config = dict(model.config)
    labels = calibration_labels(int(config["num_embeds_ada_norm"]), samples, seed)
    batches = []

    def denoise(x, t, y):
        batches.append({"sample": x.numpy().copy(), "timestep": t.numpy().copy(), "class_labels": y.numpy().copy()})
        return model(x, timestep=t, class_labels=y, return_dict=False)[0]

    with torch.no_grad():
        for _ in iterate_sampling(denoise, scheduler_config, config, labels, steps=steps,
                                  guidance_scale=guidance_scale, seed=seed):
            pass
    return batches


def quantize_static_baseline(fp32_path: Path, out_path: Path, batches: list[dict], *, matmul_only: bool) -> None:
    """ONNX Runtime's own static quantizer: per-channel QDQ, int8, calibrated on ``batches``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter(batches)

        def get_next(self):
            return next(self._items, None)

    quantize_static(
        str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"] if matmul_only else None,
    )


def latencies_ms(model_paths: dict[str, Path], feeds: dict, *, threads: int = 2, warmup: int = 3,
                 rounds: int = 15) -> dict[str, float]:
    """Median latency of each model, measured in interleaved rounds (one run of every model per round) so
    that drift of the machine (caches, frequency, other load) falls on all models alike."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in model_paths.items()}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


@functools.lru_cache(maxsize=8)
def _session(model_path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


def run_output(model_path: Path, feeds: dict) -> np.ndarray:
    return _session(str(model_path)).run(["out"], feeds)[0]


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def file_size_mb(path: Path) -> float:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total / 1e6
