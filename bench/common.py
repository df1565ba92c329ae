"""Helpers shared by the benchmark scripts: machine description, FP32 export, ORT quantize_static
baselines calibrated on the same trajectories as ditq, latency measurement, ONNX Runtime's per-op
profile aggregated by op type, and the peak memory of a child process."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import platform
import shlex
import statistics
import tempfile
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


def export_fp32(model: torch.nn.Module, path: Path, family=None, inputs: tuple[torch.Tensor, ...] | None = None
                ) -> None:
    """The float model as ONNX, by ditq's own tracer and exporter (DiT unless ``family`` is given; traced on the
    family's example inputs unless ``inputs`` are given, e.g. a recorded call that fixes PixArt's text length)."""
    from ditq_compiler.exporters import export_onnx, save_onnx
    from ditq_compiler.families import DIT
    from ditq_compiler.tracing import trace_model

    family = family or DIT
    config = dict(model.config)
    inputs = inputs if inputs is not None else family.example_inputs(config)
    gm = trace_model(model, family, config, inputs)
    save_onnx(export_onnx(gm, family.signature(config), inputs), path)


def trajectory_batches(model: torch.nn.Module, scheduler_config: dict, *, steps: int, samples: int,
                       guidance_scale: float, seed: int) -> list[dict[str, np.ndarray]]:
    """The denoiser inputs met along ditq's calibration trajectories (same labels, noise and steps)."""
    from ditq_compiler.families import DIT

    config = dict(model.config)
    labels = DIT.calibration_conditions(config, samples, seed)
    batches = []

    def denoise(x, t, y):
        batches.append({"sample": x.numpy().copy(), "timestep": t.numpy().copy(), "class_labels": y.numpy().copy()})
        return model(x, timestep=t, class_labels=y, return_dict=False)[0]

    with torch.no_grad():
        for _ in DIT.iterate_sampling(denoise, scheduler_config, config, labels, steps=steps,
                                      guidance_scale=guidance_scale, seed=seed):
            pass
    return batches


def quantize_static_baseline(fp32_path: Path, out_path: Path, batches: list[dict], *, matmul_only: bool,
                             activations: str = "int8", reduce_range: bool = False) -> None:
    """ONNX Runtime's own static quantizer: per-channel QDQ with int8 weights, calibrated (min/max) on
    ``batches``. ``activations``: ``"int8"`` (QInt8) or ``"uint8"`` (QUInt8, what ONNX Runtime's x86 int8
    GEMMs take directly); ``reduce_range``: 7-bit weights, ONNX Runtime's advice for CPUs without VNNI, whose
    u8 x s8 kernels saturate full-range int8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter(batches)

        def get_next(self):
            return next(self._items, None)

    external = file_size_mb(fp32_path) > 2000  # a model over 2 GB keeps its weights in external data
    quantize_static(
        str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        reduce_range=reduce_range, activation_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[activations],
        weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"] if matmul_only else None,
        use_external_data_format=external,
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


def close_sessions() -> None:
    """Release the sessions :func:`run_output` keeps (their weights and arenas)."""
    _session.cache_clear()


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def file_size_mb(path: Path) -> float:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total / 1e6


# Op types of ONNX Runtime's optimized CPU graph, grouped the way the profile table reports them.
PROFILE_CATEGORIES = (
    ("int8 GEMMs of the linear layers", {"MatMulIntegerToFloat", "QGemm", "MatMulInteger", "DynamicQuantizeMatMul"}),
    ("integer attention (QK^T, PV)", {"QLinearMatMul"}),  # and integer MatMuls of two activations, below
    ("float MatMuls", {"MatMul", "FusedMatMul", "Gemm"}),
    ("fused attention", {"MultiHeadAttention", "Attention", "QAttention"}),
    ("FastGelu / Gelu", {"FastGelu", "Gelu", "BiasGelu"}),
    ("Add", {"Add"}),
    ("Transpose", {"Transpose"}),
    ("QuantizeLinear", {"QuantizeLinear", "DynamicQuantizeLinear"}),
    ("Softmax", {"Softmax"}),
    ("LayerNormalization", {"LayerNormalization", "SkipLayerNormalization"}),
    ("Mul", {"Mul"}),
)
_CONTAINER_OPS = {"If", "Loop", "Scan"}  # their time is the time of the nodes inside, profiled on their own


def profile_by_op(model_path: Path, feeds: dict, *, threads: int = 2, warmup: int = 3, runs: int = 10,
                  work_dir: Path) -> dict:
    """ONNX Runtime's profiler over ``runs`` calls (after ``warmup`` unprofiled ones): per category of
    :data:`PROFILE_CATEGORIES` (and ``others``), the median over runs of the summed kernel time in ms and the
    node count per run; the median kernel total and wall time of a run (``model_run``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(work_dir) / "ort_profile")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    for _ in range(warmup + runs):
        session.run(None, feeds)
    path = Path(session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    return aggregate_profile(events, runs)


_INTEGER_MATMULS = {"MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul"}


def _category(op_type: str, args: dict | None = None) -> str:
    """The category of a kernel. An integer MatMul whose second input has more than 2 dimensions multiplies two
    activations (attention's QK^T and PV), not an activation by a weight."""
    shapes = (args or {}).get("input_type_shape") or []
    if op_type in _INTEGER_MATMULS and len(shapes) > 1 and len(next(iter(shapes[1].values()), [])) > 2:
        return "integer attention (QK^T, PV)"
    for name, ops in PROFILE_CATEGORIES:
        if op_type in ops:
            return name
    return "others"


def aggregate_profile(events: list[dict], runs: int) -> dict:
    """The last ``runs`` runs of an ONNX Runtime profile, aggregated by op category (see
    :func:`profile_by_op`)."""
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    names = [name for name, _ in PROFILE_CATEGORIES] + ["others"]
    per_run = [dict.fromkeys(names, 0.0) for _ in model_runs]
    counts = [dict.fromkeys(names, 0) for _ in model_runs]
    others: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op_type = event["args"].get("op_name", "?")
        if op_type in _CONTAINER_OPS:
            continue
        for index, (start, end) in enumerate(model_runs):
            if start <= event["ts"] <= end:
                category = _category(op_type, event["args"])
                per_run[index][category] += event["dur"] / 1e3
                counts[index][category] += 1
                if category == "others":
                    others[op_type] = others.get(op_type, 0.0) + event["dur"] / 1e3 / len(model_runs)
                break
    median = statistics.median
    return {
        "categories": {name: median(run[name] for run in per_run) for name in names},
        "nodes": counts[0],
        "kernel_total_ms": median(sum(run.values()) for run in per_run),
        "wall_ms": median((end - start) / 1e3 for start, end in model_runs),
        "others": dict(sorted(others.items(), key=lambda item: -item[1])),
    }


def current_rss_bytes() -> int:
    return _status_bytes("VmRSS:")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program (``VmHWM``: the kernel's high-water
    mark of this image's memory, every page counted, not sampled)."""
    return _status_bytes("VmHWM:")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


# the label of samples taken while no named phase runs: the fx passes other than calibration, and every step
# between phases (the manifest, loading the artifact back at the end)
OUTSIDE_PHASES = "outside the named phases"


class PhaseMemorySampler:
    """Samples this process's resident memory every ``interval`` seconds in a thread and files the peak under
    ``label()`` (e.g. ditq's current progress phase), so a compile's peak can be traced to the work that made
    it. The overall peak of the process is :func:`peak_rss_bytes`, not sampled."""

    def __init__(self, label, interval: float = 0.05):
        import threading

        self.label, self.interval = label, interval
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.order: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            label = self.label() or OUTSIDE_PHASES
            rss = current_rss_bytes()
            if label not in self.peaks:
                self.order.append(label)
            self.peaks[label] = max(self.peaks.get(label, 0), rss)
            self._stop.wait(self.interval)
            now = time.perf_counter()
            self.seconds[label] = self.seconds.get(label, 0.0) + now - last
            last = now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> list[tuple[str, int, float]]:
        """(label, peak resident bytes, seconds spent) in the order the labels first appeared."""
        return [(label, self.peaks[label], self.seconds.get(label, 0.0)) for label in self.order]


def run_child(args: list[str]) -> tuple[int, float]:
    """Run ``python args...`` and return (exit code, wall seconds). Its peak memory is not read here: a child's
    ``ru_maxrss`` (``os.wait4``) starts from the spawning parent's peak (measured: a child of a 2 GB parent
    reports 1.98 GB and its own peak is 11 MB), so the child reports :func:`peak_rss_bytes` itself."""
    import subprocess
    import sys

    start = time.perf_counter()
    process = subprocess.run([sys.executable, *args])
    return process.returncode, time.perf_counter() - start


def run_command(script: str, argv: list[str]) -> str:
    """The command that reproduces a run, for its report: ``python script`` and its arguments without ``--out``
    (where the report went is not a setting of the run, and a path of the machine that ran it does not belong
    in the report)."""
    shown, after_out = [], False
    for arg in argv:
        if after_out or arg == "--out" or arg.startswith("--out="):
            after_out = arg == "--out"
            continue
        shown.append(arg)
    return shlex.join(["python", script, *shown])


@contextlib.contextmanager
def work_directory(keep: Path | None, prefix: str):
    """``keep`` (created, and left in place) when given, else a temporary directory removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


MARKER = re.compile(r"<!-- ([\w-]+):(begin|end) -->")


def marked_blocks(path: Path) -> list[list[str]]:
    """Every ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->`` block of ``path`` (markers kept), in file order:
    the sections other scripts own, which a script that rewrites the file keeps as they are."""
    if not path.exists():
        return []
    blocks, current, name = [], None, None
    for line in path.read_text().splitlines():
        marker = MARKER.fullmatch(line.strip())
        if current is None and marker and marker[2] == "begin":
            current, name = [], marker[1]
        if current is not None:
            current.append(line)
            if marker and marker[2] == "end" and marker[1] == name:
                blocks.append(current)
                current = None
    return blocks


def write_marked_block(path: Path, name: str, body: list[str]) -> None:
    """Replace the ``name`` block of ``path`` with ``body`` between its markers (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    lines = path.read_text().splitlines() if path.exists() else []
    block = [begin, *body, end]
    if begin in lines and end in lines:
        lines[lines.index(begin):lines.index(end) + 1] = block
    else:
        lines += ["", *block] if lines else block
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
