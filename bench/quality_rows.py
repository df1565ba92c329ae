"""The rows of the quality benchmark: one registry, a filter over it, building each row's ONNX model and
sampling from it.

A row is a label and how its model is made. The peers are fixed (the FP32 export, and ONNX Runtime's
``quantize_static`` on it); every ditq row is ``label -> CompileConfig keyword arguments`` in
:data:`DITQ_ROWS`, so adding a row is adding one line there (calibration settings come from the command line
and are the same for every row).
"""

from __future__ import annotations

import fnmatch
import re
import time
from pathlib import Path

import torch

FP32 = "FP32"
QS_ALL = "ORT quantize_static W8A8 (all ops)"
QS_MATMUL = "ORT quantize_static W8A8 (MatMul/Gemm)"
# ONNX Runtime's own static quantizer on the FP32 export: label -> quantize only MatMul/Gemm?
QUANTIZE_STATIC_ROWS: dict[str, bool] = {QS_ALL: False, QS_MATMUL: True}

BASE = "ditq W8A8 minmax"
SMOOTHING_RECIPES = ("minmax", "smoothquant", "ptq4dit", "htg", "vidit", "dilate")


def recipe_label(recipe: str, groups: int = 1, grouping: str = "htg") -> str:
    """The label of a ditq W8A8 row: ``ditq W8A8 <recipe>[, <groups> groups <grouping>]``."""
    return f"ditq W8A8 {recipe}" + ("" if groups == 1 else f", {groups} groups {grouping}")


# ditq rows: label -> CompileConfig keyword arguments. Every smoothing recipe with one set of activation
# parameters and with 4 HTG timestep groups, and minmax with 4 uniform groups (HTG's grouping vs the naive one).
DITQ_ROWS: dict[str, dict] = {
    **{recipe_label(r): dict(format="w8a8", recipe=r) for r in SMOOTHING_RECIPES},
    recipe_label("minmax", 4, "uniform"): dict(format="w8a8", recipe="minmax", groups=4, grouping="uniform"),
    **{recipe_label(r, 4, "htg"): dict(format="w8a8", recipe=r, groups=4, grouping="htg") for r in SMOOTHING_RECIPES},
}

LOW_BIT_FORMATS = ("w4a8", "fp8", "fp4")
ROTATED_RECIPES = ("minmax", "smoothquant")


def format_label(format: str, recipe: str, groups: int = 4, grouping: str = "htg", rotate: str = "none") -> str:
    """The label of a low-bit row: ``ditq <FORMAT> <recipe>[, <groups> groups <grouping>][, <rotate> rotation]``."""
    name = {"w4a8": "W4A8", "fp8": "FP8", "fp4": "FP4 (W4A4)"}[format]
    return (f"ditq {name} {recipe}" + ("" if groups == 1 else f", {groups} groups {grouping}")
            + ("" if rotate == "none" else f", {rotate} rotation"))


# Low-bit rows (issue: formats): every format with every recipe at 4 HTG groups, and with Hadamard rotation for
# minmax and SmoothQuant; integer attention on (--quantize-attention), to see what it costs at W8A8.
DITQ_ROWS.update({
    **{format_label(f, r): dict(format=f, recipe=r, groups=4, grouping="htg")
       for f in LOW_BIT_FORMATS for r in SMOOTHING_RECIPES},
    **{format_label(f, r, rotate="hadamard"): dict(format=f, recipe=r, groups=4, grouping="htg", rotate="hadamard")
       for f in LOW_BIT_FORMATS for r in ROTATED_RECIPES},
    "ditq W8A8 minmax, integer attention": dict(format="w8a8", recipe="minmax", quantize_attention=True),
    "ditq W8A8 minmax, 4 groups htg, integer attention": dict(format="w8a8", recipe="minmax", groups=4,
                                                               grouping="htg", quantize_attention=True),
    # issue 11: the embedders' linears and the final layer quantized too (--quantize-embedders)
    "ditq W8A8 minmax, embedders and final layer quantized": dict(format="w8a8", recipe="minmax",
                                                                   quantize_embedders=True),
})

# Reconstruction (issue 10): W4A8 and FP4 on the best recipe with 4 HTG groups, plus each --reconstruct method
# (its default 200 iterations per block). The row without a method is the format row above. Set the recipe here
# once the formats' rows say which one is best.
RECONSTRUCTION_RECIPES = {"w4a8": "ptq4dit", "fp4": "ptq4dit"}
RECONSTRUCTION_METHODS = ("gptq", "brecq", "bkd")


def reconstruction_label(format: str, method: str) -> str:
    """``ditq W4A8 <recipe>, 4 groups htg + <method>``."""
    return f"{format_label(format, RECONSTRUCTION_RECIPES[format])} + {method}"


DITQ_ROWS.update({
    reconstruction_label(f, m): dict(format=f, recipe=r, groups=4, grouping="htg", reconstruct=m)
    for f, r in RECONSTRUCTION_RECIPES.items() for m in RECONSTRUCTION_METHODS})


def reconstruction_quality_rows() -> list[str]:
    """The reconstruction rows and the rows they are compared with (the same format and recipe without it)."""
    return [label for f, r in RECONSTRUCTION_RECIPES.items()
            for label in (format_label(f, r), *(reconstruction_label(f, m) for m in RECONSTRUCTION_METHODS))]


ALL_ROWS: tuple[str, ...] = (FP32, *QUANTIZE_STATIC_ROWS, *DITQ_ROWS)


def matches(label: str, pattern: str) -> bool:
    """A glob (``*``, ``?``, ``[``) matches the whole label, anything else is a substring; case-insensitive."""
    label, pattern = label.lower(), pattern.lower()
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(label, pattern)
    return pattern in label


def select_rows(patterns: list[str] | None) -> list[str]:
    """The registry's labels matching any of ``patterns`` (all when none), in registry order. FP32 is always
    kept: it is the reference of PSNR and of the fidelity metric. A pattern matching nothing is an error."""
    if not patterns:
        return list(ALL_ROWS)
    for pattern in patterns:
        if not any(matches(label, pattern) for label in ALL_ROWS):
            raise SystemExit(f"--rows {pattern!r} matches no row; rows are: " + "; ".join(ALL_ROWS))
    return [label for label in ALL_ROWS if label == FP32 or any(matches(label, p) for p in patterns)]


def ort_denoiser(path: Path, threads: int = 2):
    """``denoise(sample, timestep, class_labels)`` running ``path`` in ONNX Runtime on the CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def denoise(x, t, y):
        return torch.from_numpy(session.run(["out"], {"sample": x.numpy(), "timestep": t.numpy(),
                                                      "class_labels": y.numpy()})[0])
    return denoise


def row_slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def row_directory(work: Path, label: str) -> Path:
    """Where a ditq row's artifact is built: named after the label, so a run with ``--work`` can reuse it."""
    return work / f"ditq-{row_slug(label)}"


def build_rows(checkpoint: Path, work: Path, labels: list[str], calibration
               ) -> tuple[dict[str, Path], dict[str, str], object]:
    """Export / quantize / compile the models of ``labels`` into ``work``. Returns label -> ONNX model path,
    label -> error line for the ditq rows that failed to compile (the others still run), and the loaded
    checkpoint. ``calibration`` (a ``CalibrationConfig``) is shared by ditq and ``quantize_static``: the
    same trajectories."""
    from common import export_fp32, quantize_static_baseline, trajectory_batches

    from ditq_compiler import CompileConfig
    from ditq_compiler import compile as compile_checkpoint
    from ditq_compiler.errors import DitqError
    from ditq_compiler.loading import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    paths, failed = {FP32: work / "fp32.onnx"}, {}
    export_fp32(loaded.model, paths[FP32])
    if any(label in QUANTIZE_STATIC_ROWS for label in labels):
        batches = trajectory_batches(loaded.model, loaded.scheduler_config, steps=calibration.steps,
                                     samples=calibration.samples, guidance_scale=calibration.guidance_scale,
                                     seed=calibration.seed)
    for index, label in enumerate(labels):
        start = time.perf_counter()
        if label in QUANTIZE_STATIC_ROWS:
            paths[label] = work / f"qs-{index}.onnx"
            quantize_static_baseline(paths[FP32], paths[label], batches, matmul_only=QUANTIZE_STATIC_ROWS[label])
        elif label in DITQ_ROWS:
            config = CompileConfig(calibration=calibration, **DITQ_ROWS[label])
            directory, record = row_directory(work, label), work / f"{row_slug(label)}.config"
            settings = f"{loaded.source}\n{config!r}"  # the checkpoint and the configuration it was built with
            if record.is_file() and record.read_text() == settings and (directory / "model.onnx").is_file():
                paths[label] = directory / "model.onnx"  # built by an earlier run into the same --work
                print(f"{label}: reused from {directory}", flush=True)
                continue
            try:
                artifact = compile_checkpoint(loaded.source, directory, config, force=directory.exists())
            except DitqError as exc:
                failed[label] = str(exc)
                print(f"{label}: did not compile: {exc}", flush=True)
                continue
            record.write_text(settings)
            paths[label] = artifact.model_path
        if label != FP32:
            print(f"{label}: built in {time.perf_counter() - start:.0f} s", flush=True)
    return {label: paths[label] for label in labels if label in paths}, failed, loaded


def class_labels(count: int) -> list[int]:
    """The classes the benchmark samples: 0-9 in turn."""
    return [i % 10 for i in range(count)]


def sample_row(path: Path, loaded, count: int, *, steps: int, guidance_scale: float, seed: int) -> torch.Tensor:
    """``count`` samples (classes 0-9 in turn) of the model at ``path``, ``[count, C, H, W]``."""
    from ditq_compiler.families import DIT
    from ditq_compiler.sampling import sample

    return sample(DIT, ort_denoiser(path), loaded.scheduler_config, loaded.model_config, class_labels(count),
                  steps=steps, guidance_scale=guidance_scale, seed=seed)
