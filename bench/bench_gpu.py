"""GPU benchmark: end-to-end sampling latency and peak GPU memory on an NVIDIA GPU; writes a section of
docs/benchmarks.md naming the GPU.

Model: the DiT-XL/2 shape (28 blocks, hidden 1152, 16 heads, patch 2) with random weights, 256 px (32x32x4
latents, 256 tokens), DiT's DDPM scheduler, 50 sampling steps with classifier-free guidance (so the denoiser
sees batch 2B), for B = 1 and 8. Rows, each in its own process (so that its peak memory is its own):

* torch fp16 (diffusers ``DiTTransformer2DModel`` in float16, SDPA attention);
* ONNX Runtime CUDA fp16: the float model exported by ditq and lowered for the cuda target (float16,
  fused attention; no quantized layer);
* ONNX Runtime TensorRT fp16: the float model lowered for the tensorrt target, TensorRT provider with
  ``trt_fp16_enable``;
* ditq cuda W8 and W4 (weight-only MatMulNBits, float16 activations);
* ditq tensorrt W8A8 (int8 Q/DQ) and, when the format exists, FP8.

Latency: the whole 50-step loop (scheduler included), median of ``--rounds`` after one warm-up loop (the
warm-up also builds TensorRT's engines, cached in the work directory). Peak memory: torch's
``max_memory_allocated`` for the torch row; for ONNX Runtime rows the process's GPU memory as NVML reports
it (sampled every 20 ms; ``pip install nvidia-ml-py``; without it the column says n/a), minus what the
process held before the session (the CUDA context).
Calibration (random weights: quality is not measured) is the shortest: 2 steps, 1 sample.

    python bench/bench_gpu.py                     # every row, B = 1 and 8 (needs an NVIDIA GPU)
    python bench/bench_gpu.py --rows 'ditq cuda W8' --batches 1

Without a GPU it says so and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- gpu-bench:begin -->", "<!-- gpu-bench:end -->"
XL = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, in_channels=4, out_channels=8,
          sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
STEPS = 50
ROWS = {  # label -> how the row is built and run
    "torch fp16 (diffusers)": dict(kind="torch"),
    "ONNX Runtime CUDA fp16": dict(kind="float", target="cuda", provider="cuda"),
    "ONNX Runtime TensorRT fp16": dict(kind="float", target="tensorrt", provider="tensorrt"),
    "ditq cuda W8": dict(kind="ditq", format="w8a8", target="cuda", provider="cuda"),
    "ditq cuda W4": dict(kind="ditq", format="w4a8", target="cuda", provider="cuda"),
    "ditq tensorrt W8A8 int8": dict(kind="ditq", format="w8a8", target="tensorrt", provider="tensorrt"),
    "ditq tensorrt FP8": dict(kind="ditq", format="fp8", target="tensorrt", provider="tensorrt"),
}


def gpu_status() -> tuple[str | None, str]:
    """(GPU name, '') when an NVIDIA GPU is usable by torch and ONNX Runtime's CUDA provider, else (None, why)."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device"
    from ditq_compiler.runtime import cuda_usable

    usable, why = cuda_usable()
    if not usable:
        return None, f"ONNX Runtime's CUDA provider cannot start: {why}"
    return torch.cuda.get_device_name(0), ""


def random_xl(seed: int = 0):
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**XL).eval()
    with torch.no_grad():  # adaLN-zero starts at zero; random weights everywhere, as a trained model has
        for parameter in model.parameters():
            if parameter.dim() == 2 and parameter.abs().sum() == 0:
                parameter.normal_(0, 0.02)
    return model


class GpuMemorySampler:
    """Peak GPU memory of this process (NVML), sampled every 20 ms in a thread."""

    def __init__(self):
        import os

        self.peak, self._stop, self._pid = 0, threading.Event(), os.getpid()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001  (no NVML: memory is not measured)
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def current(self) -> int:
        if self._nvml is None:
            return 0
        for process in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if process.pid == self._pid:
                return int(process.usedGpuMemory or 0)
        return 0

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_row(label: str, batch: int, work: Path, rounds: int) -> dict:
    """Build and time one row in this process; returns latency (s) and peak memory (MB)."""
    spec = ROWS[label]
    checkpoint = work / "dit-xl"
    labels = [i % 1000 for i in range(batch)]
    if spec["kind"] == "torch":
        return _torch_row(checkpoint, labels, rounds)
    if spec["kind"] == "float":
        denoise, provider = _float_denoiser(checkpoint, spec["target"], spec["provider"], work)
    else:
        denoise, provider = _ditq_denoiser(checkpoint, label, spec, work)
        if denoise is None:
            return {"skipped": provider}
    from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG
    from ditq_compiler.families import DIT
    from ditq_compiler.sampling import sample

    sampler = GpuMemorySampler()
    context = sampler.current()
    with sampler:
        sample(DIT, denoise, DEFAULT_SCHEDULER_CONFIG, XL, labels, steps=STEPS, guidance_scale=4.0, seed=0)  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            sample(DIT, denoise, DEFAULT_SCHEDULER_CONFIG, XL, labels, steps=STEPS, guidance_scale=4.0, seed=0)
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times),
            "peak_mb": (sampler.peak - context) / 2**20 if sampler.available else None,
            "provider": provider}


def _ditq_denoiser(checkpoint: Path, label: str, spec: dict, work: Path):
    """A ditq artifact of the row's format and target (compiled once into the work directory)."""
    import torch

    from ditq_compiler import Artifact, CalibrationConfig, CompileConfig
    from ditq_compiler import compile as compile_checkpoint
    from ditq_compiler.config import FORMATS

    if not FORMATS[spec["format"]].implemented:
        return None, f"format {spec['format']} is not implemented"
    path = work / label.replace(" ", "-")
    if not (path / "manifest.json").is_file():
        compile_checkpoint(checkpoint, path, CompileConfig(format=spec["format"], target=spec["target"],
                                                           calibration=CalibrationConfig(steps=2, samples=1)))
    artifact = Artifact.load(path)
    artifact.tensorrt_cache = work / "trt-cache"

    def denoise(x, t, y):
        return torch.from_numpy(artifact.denoise(x.numpy(), t, y.numpy(), provider=spec["provider"]))
    return denoise, spec["provider"]


def _float_denoiser(checkpoint: Path, target: str, provider: str, work: Path):
    """The float model, exported by ditq and lowered for ``target`` with no quantized layer."""
    import torch
    from diffusers import DiTTransformer2DModel

    from ditq_compiler.exporters import export_onnx, save_onnx
    from ditq_compiler.exporters.lowering import LoweringContext, lower
    from ditq_compiler.families import DIT
    from ditq_compiler.runtime import create_session, run_denoiser, tensorrt_provider_options
    from ditq_compiler.tracing import trace_model

    path = work / f"float-{target}" / "model.onnx"
    if not path.is_file():
        model = DiTTransformer2DModel.from_pretrained(checkpoint).eval()
        inputs = DIT.example_inputs(XL, batch=2)
        exported = export_onnx(trace_model(model, DIT, XL, inputs), DIT.signature(XL), inputs)
        probe = {0: [tuple(t.numpy() for t in inputs)]}
        lowered = lower(exported, target, {}, context=LoweringContext(probe_inputs=probe))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_onnx(lowered.model, path)
        del exported, lowered
    session = create_session(path, provider, target=target,
                             tensorrt_options=tensorrt_provider_options(work / "trt-cache", int8=False))

    def denoise(x, t, y):
        return torch.from_numpy(run_denoiser(session, DIT.signature(XL), (x, t, y)))
    return denoise, session.get_providers()[0]


def _torch_row(checkpoint: Path, labels: list[int], rounds: int) -> dict:
    import torch
    from diffusers import DiTTransformer2DModel

    from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG
    from ditq_compiler.families import DIT
    from ditq_compiler.sampling import sample

    model = DiTTransformer2DModel.from_pretrained(checkpoint, torch_dtype=torch.float16).cuda().eval()
    config = dict(model.config)

    @torch.no_grad()
    def denoise(x, t, y):
        return model(x.cuda().half(), t.cuda(), y.cuda()).sample.float().cpu()

    torch.cuda.reset_peak_memory_stats()
    sample(DIT, denoise, DEFAULT_SCHEDULER_CONFIG, config, labels, steps=STEPS, guidance_scale=4.0, seed=0)
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        sample(DIT, denoise, DEFAULT_SCHEDULER_CONFIG, config, labels, steps=STEPS, guidance_scale=4.0, seed=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "provider": "torch cuda"}


def write_section(gpu: str, results: dict, batches: list[int]) -> None:
    lines = [BEGIN, f"## GPU: DiT-XL/2 shape, 256 px, {STEPS} steps with guidance ({gpu})", "",
             f"Written by `python bench/bench_gpu.py` on {datetime.date.today().isoformat()}; random weights; latency "
             "of the whole sampling loop (median), peak GPU memory of the process.", "",
             "| row | " + " | ".join(f"B={b} latency (s) | B={b} peak memory (MB)" for b in batches) + " |",
             "|---|" + "---:|---:|" * len(batches)]
    for label in ROWS:
        cells = []
        for b in batches:
            r = results.get((label, b), {})
            memory = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "n/a"
            cells += [f"{r['seconds']:.2f}", memory] if "seconds" in r else \
                [r.get("skipped", r.get("error", "not run")), ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(END)
    text = DOCS.read_text() if DOCS.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + "\n".join(lines) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    DOCS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, help="work directory (artifacts, TensorRT engines); default temporary")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu, why = gpu_status()
    if gpu is None:
        print(f"bench_gpu: no NVIDIA GPU found ({why}); nothing measured, {DOCS.relative_to(ROOT)} unchanged")
        return 0
    if args.row:
        print(json.dumps(run_row(args.row, args.batch, args.work, args.rounds)))
        return 0
    with tempfile.TemporaryDirectory(prefix="ditq-bench-gpu-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "dit-xl" / "config.json").is_file():
            random_xl().save_pretrained(work / "dit-xl", safe_serialization=True)
        # With --work, results persist there, so a run split over several invocations writes one table.
        saved = work / "results.json"
        results = {(r["row"], r["batch"]): r["result"] for r in json.loads(saved.read_text())} \
            if args.work and saved.is_file() else {}
        for batch in args.batches:
            for label in args.rows:
                command = [sys.executable, __file__, "--row", label, "--batch", str(batch), "--work", str(work),
                           "--rounds", str(args.rounds)]
                done = subprocess.run(command, capture_output=True, text=True)
                try:
                    results[(label, batch)] = json.loads(done.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    results[(label, batch)] = {"error": f"failed: {tail[:80]}"}
                print(f"B={batch} {label}: {results[(label, batch)]}", flush=True)
                saved.write_text(json.dumps([{"row": r, "batch": b, "result": v} for (r, b), v in results.items()]))
        write_section(gpu, results, sorted({b for _, b in results}))
    print(f"wrote the GPU section of {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
