"""The ``ditq`` command line: compile, inspect, run, verify.

Every bad input is one line on stderr and exit code 2: ditq's own errors (:class:`DitqError`) and
argparse's (an unknown option, a number that does not parse), which argparse would otherwise print as
a usage block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ACTIVATION_MODES, WEIGHT_BLOCKS
from .config import (FORMATS, GROUPINGS, PRECISIONS, RECIPES, ROTATIONS, SCALE_SHARING, UNFOLDABLE_MODES, WEIGHT_CLIPS,
                     WEIGHT_RANGES, CalibrationConfig, CompileConfig, LayerRule)
from .config import TARGETS
from .config import RECONSTRUCT_WEIGHTS, RECONSTRUCTIONS
from .errors import DitqError

DESCRIPTION = """\
ditq compiles a Diffusion Transformer checkpoint into a quantized ONNX artifact that ONNX Runtime runs
on fused int8 kernels.

CHECKPOINT is a diffusers model directory (config.json + safetensors) of DiTTransformer2DModel or
PixArtTransformer2DModel, a diffusers pipeline directory (transformer/, scheduler/; a PixArt pipeline's
text encoder and tokenizer calibrate it), or an original facebookresearch DiT .pt state dict or training
checkpoint. Nothing in a checkpoint is executed: weights are read with safetensors or
torch.load(weights_only=True).

examples:
  ditq compile models/dit-digits -o out/dit-digits-w8a8 --format w8a8 --recipe minmax
  ditq inspect models/dit-digits --dump-dir out/dumps
  ditq run out/dit-digits-w8a8 --steps 50 --class-labels 1 3 --seed 0 -o out/samples.npz
  ditq compile PIXART_PIPELINE_DIR -o out/pixart-w8a8 --format w8a8 --recipe smoothquant
  ditq record PIXART_PIPELINE_DIR -o calls.safetensors   (then: ditq compile PIXART_DIR/transformer
      --calibration-inputs calls.safetensors ...)
  ditq run out/pixart-w8a8 --prompt "a red fox in the snow" --pipeline PIXART_PIPELINE_DIR -o out/fox.npz
"""


def _formats_help() -> str:
    return "; ".join(f"{n}: {s.description}{'' if s.implemented else ' (not yet)'}" for n, s in FORMATS.items())


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="diffusers model or pipeline directory, or original DiT .pt")
    parser.add_argument("--num-heads", type=int, default=None, metavar="N",
                        help="attention heads of an original DiT .pt, whose tensors do not say it: needed when "
                             "its width is none of the published sizes (DiT-S/B/L/XL: 384/768/1024/1152) and it "
                             "is no training checkpoint naming its model (args.model); N must divide the width. "
                             "A diffusers config's num_attention_heads must agree with it")
    parser.add_argument("--format", default="w8a8", metavar="FORMAT", help=f"number format. {_formats_help()}")
    parser.add_argument("--recipe", default="minmax", metavar="RECIPE",
                        help="how quantization parameters are chosen (default minmax). " +
                             "; ".join(f"{n}: {r.description}" for n, r in RECIPES.items()) +
                             ". Smoothing is folded exactly into the adaLN modulation rows (q/k/v and fc1 inputs) "
                             "and into V (attention output); `ditq inspect` shows every fold.")
    parser.add_argument("--alpha", type=float, default=None, metavar="A",
                        help="migration strength of smoothquant and vidit, in [0, 1] (default 0.5)")
    parser.add_argument("--unfoldable", default="skip", metavar="MODE",
                        help="inputs with no exact fold (fc2 after GELU, adaLN after SiLU): " +
                             "; ".join(f"{n}: {d}" for n, d in UNFOLDABLE_MODES.items()) + " (default skip)")
    parser.add_argument("--smooth-scales", default=None, metavar="MODE",
                        help="smoothing scales across timestep groups: " +
                             "; ".join(f"{n}: {d}" for n, d in SCALE_SHARING.items()) +
                             " (default: per-group for vidit, shared otherwise)")
    parser.add_argument("--weight-range", default="reduced", metavar="RANGE",
                        help="int8 weight range: " + "; ".join(f"{n}: {d}" for n, d in WEIGHT_RANGES.items()) +
                             " (default reduced)")
    parser.add_argument("--layer", action="append", default=[], metavar="PATTERN=PRECISION",
                        help="the precision of the linear layers whose module name matches the glob PATTERN: "
                             f"{', '.join(PRECISIONS)} (the weights/activations of the format of that name) or fp "
                             "(keep in float), e.g. 'transformer_blocks.0.*=fp' or '*.ff.net.2=int8'. Repeatable; "
                             "applied after the default set (every block linear and adaLN modulation at the "
                             "format's precision), later rules win. A pattern that matches nothing is an error.")
    parser.add_argument("--quantize-attention", action=argparse.BooleanOptionalAction, default=False,
                        help="quantize q, k, v and the softmax output to uint8 so ONNX Runtime runs QK^T and PV on "
                             "its integer kernels (--target cpu, static integer activations). Off by default: "
                             "faster, but it costs PSNR on the reference model (docs/quality.md); without it the "
                             "float attention runs as ONNX Runtime's fused MultiHeadAttention")
    parser.add_argument("--quantize-embedders", action="store_true",
                        help="also quantize the timestep/class embedders' linears and the final layer (proj_out_1, "
                             "proj_out_2) at the format's precision; they stay in float by default (the class "
                             "embedding table and the patch convolution stay in float either way)")
    parser.add_argument("--rotate", default="none", metavar="ROTATION",
                        help="; ".join(f"{n}: {d}" for n, d in ROTATIONS.items()) + " (default none)")
    parser.add_argument("--keep-sensitive", type=int, default=0, metavar="K",
                        help="mixed precision: measure each layer's sensitivity (the output error of quantizing it "
                             "alone, per timestep group) and move the K most sensitive inputs' layers up a "
                             "precision (int4/fp4 -> int8, int8/fp8 -> float); listed in the manifest and dumps")
    parser.add_argument("--budget-mb", type=float, default=None, metavar="MB",
                        help="mixed precision by size: move the most sensitive layers up while the quantized "
                             "weights fit MB")
    parser.add_argument("--weight-clip", default=None, metavar="METHOD",
                        help="weight scale search per output channel: " +
                             "; ".join(f"{n}: {d}" for n, d in WEIGHT_CLIPS.items()) +
                             " (default: percentile for ptq4dit, mse for fp4, minmax otherwise)")
    parser.add_argument("--weight-block", type=int, default=None, metavar="|".join(map(str, WEIGHT_BLOCKS)),
                        help="int4 weights with one scale per block of that many inputs of each output channel, run "
                             "as MatMulNBits (cpu target); default: per output channel, int4 behind Cast on "
                             "MatMulIntegerToFloat, measured 1.2-3x faster on a 2-core AVX2 CPU")
    parser.add_argument("--act", default="static", metavar="MODE",
                        help="activation quantization: " + "; ".join(f"{n}: {d}" for n, d in ACTIVATION_MODES.items())
                             + " (default static)")
    parser.add_argument("--reconstruct", default="none", metavar="METHOD",
                        help="learn the weights' rounding against the float model after the parameters are chosen: "
                             + "; ".join(f"{n}: {d}" for n, d in RECONSTRUCTIONS.items())
                             + " (default none). Block inputs are cached on disk between blocks; the result "
                               "is ordinary quantized weights and parameters, on the same fused kernels")
    parser.add_argument("--reconstruct-iters", type=int, default=200, metavar="N",
                        help="training iterations per DiT block for brecq and bkd (default 200); 0 keeps nearest "
                             "rounding for every method (model.onnx is then byte-identical to --reconstruct none's)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                        help="wall-clock minutes for the whole reconstruction, shared among the blocks; training "
                             "stops cleanly when it is spent, keeping each block's best parameters so far "
                             "(default: no limit)")
    parser.add_argument("--reconstruct-weights", default="pooled", metavar="MODE",
                        help="with timestep groups: " + "; ".join(f"{n}: {d}" for n, d in RECONSTRUCT_WEIGHTS.items())
                             + " (default pooled)")
    parser.add_argument("--calib-steps", type=int, default=25, help="sampling steps of each calibration "
                        "trajectory (default 25, as PTQ4DiT)")
    parser.add_argument("--calib-samples", type=int, default=8, help="(noise, class) pairs calibrated on "
                        "(default 8); each runs with its classifier-free-guidance twin. Text-to-image models: the "
                        "prompts per pipeline call")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="text-to-image models (PixArt): the calibration prompts, one per line (default: ditq's "
                             f"{len(_calibration_prompts())} varied prompts); the pipeline runs each against the "
                             "empty prompt, as classifier-free guidance does")
    parser.add_argument("--calibration-inputs", type=Path, default=None, metavar="FILE",
                        help="text-to-image models: calibrate on transformer inputs recorded by `ditq record` "
                             "instead of running the pipeline's text encoder (needed for a transformer-only "
                             "directory); checked against the model's widths, and random text embeddings are "
                             "refused")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="guidance of the calibration "
                        "trajectories (default 4.0, as diffusers' DiTPipeline)")
    parser.add_argument("--groups", type=int, default=1, help="timestep groups, each with its own activation "
                        "parameters and its own branch in the artifact, selected from `timestep` inside the graph "
                        "(default 1)")
    parser.add_argument("--grouping", default="uniform", choices=list(GROUPINGS),
                        help="how timesteps are grouped: " + "; ".join(f"{n}: {d}" for n, d in GROUPINGS.items()))
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration noise and classes")
    parser.add_argument("--no-verify", action="store_true", help="skip the check that ONNX Runtime fused every "
                        "quantized layer into an int8 kernel")
    parser.add_argument("--target", default="cpu", choices=list(TARGETS), help="where the artifact runs: " +
                        "; ".join(f"{n}: {t.description}" for n, t in TARGETS.items()) + " (default cpu)")


def _config_from(args) -> CompileConfig:
    return CompileConfig(
        format=args.format, recipe=args.recipe,
        layer_rules=tuple(LayerRule.parse(text) for text in args.layer),
        calibration=CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples,
                                      guidance_scale=args.guidance_scale, seed=args.seed,
                                      prompts=_path_or_none(args.prompts), inputs=_path_or_none(args.calibration_inputs)),
        groups=args.groups, grouping=args.grouping,
        alpha=args.alpha, unfoldable=args.unfoldable, smooth_scales=args.smooth_scales,
        weight_range=args.weight_range, weight_clip=args.weight_clip,
        keep_sensitive=args.keep_sensitive, budget_mb=args.budget_mb, rotate=args.rotate,
        quantize_attention=args.quantize_attention, quantize_embedders=args.quantize_embedders,
        verify_fusion=not args.no_verify, target=args.target,
        act=args.act, weight_block=args.weight_block,
        reconstruct=args.reconstruct, reconstruct_iters=args.reconstruct_iters, time_budget_min=args.time_budget,
        reconstruct_weights=args.reconstruct_weights,
        num_heads=args.num_heads,
    ).validate()


def _path_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _calibration_prompts() -> tuple[str, ...]:
    from .prompts import CALIBRATION_PROMPTS

    return CALIBRATION_PROMPTS


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``ditq compile: error: ...``) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="ditq", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ditq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compile_parser = commands.add_parser(
        "compile", help="compile a checkpoint into a quantized ONNX artifact directory",
        description="Trace, calibrate along sampling trajectories, quantize and export. The artifact directory "
                    "(model.onnx + manifest.json) is written atomically: a failed compile leaves no artifact "
                    "and never overwrites a good one.")
    _add_compile_options(compile_parser)
    compile_parser.add_argument("-o", "--output", type=Path, required=True, metavar="ARTIFACT_DIR",
                                help="the artifact directory to write (created with its parents; written beside it "
                                     "and renamed into place when complete). An existing ditq artifact or empty "
                                     "directory is replaced; any other directory only with --force")
    compile_parser.add_argument("--force", action="store_true", help="replace ARTIFACT_DIR even when it exists "
                                "and is not a ditq artifact, deleting its contents (without --force such a "
                                "directory is refused; an existing artifact is always replaced atomically)")
    compile_parser.add_argument("--dump-dir", type=Path, help="also write every pass's output there (see inspect)")

    inspect_parser = commands.add_parser(
        "inspect", help="run the pipeline and dump every pass's output",
        description="Runs the compile pipeline and writes, into --dump-dir: 000_traced.txt, NNN_<pass>.txt (the "
                    "pass's summary, its per-layer decisions, op counts and the graph), timings.txt, the exported "
                    "model.onnx, ort_optimized.txt (the kernels ONNX Runtime runs for each quantized layer) and "
                    "layer_error.txt/.png (which layers contribute the quantization error, per timestep).")
    _add_compile_options(inspect_parser)
    inspect_parser.add_argument("--dump-dir", type=Path, required=True, metavar="DUMPS")

    run_parser = commands.add_parser(
        "run", help="sample from an artifact with ONNX Runtime",
        description="Class-conditional models (DiT): runs the sampling loop of the artifact's scheduler "
                    "(classifier-free guidance as DiT) and saves the samples as .npz (arrays 'samples' [N, C, H, W] "
                    "and 'class_labels'), plus a PNG grid beside it when the model has 1 or 3 channels. "
                    "Text-to-image models (PixArt): the diffusers pipeline (--pipeline) generates with the artifact "
                    "as pipe.transformer; the images are saved as .npz ('images' [N, H, W, 3] in [0, 1] and "
                    "'prompts') and one PNG per prompt beside it.")
    run_parser.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    run_parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    run_parser.add_argument("--class-labels", type=int, nargs="+", default=None, help="class-conditional models "
                            "(DiT): one sample per label (default 0)")
    run_parser.add_argument("--prompt", nargs="+", default=None, metavar="PROMPT", help="text-to-image models "
                            "(PixArt): one image per prompt, generated by the diffusers pipeline with the artifact as "
                            "its transformer")
    run_parser.add_argument("--pipeline", type=Path, default=None, metavar="PIPELINE_DIR",
                            help="text-to-image models: the diffusers pipeline that encodes the prompts, schedules "
                                 "and decodes (default: the pipeline directory the artifact was compiled from)")
    run_parser.add_argument("--guidance-scale", type=float, default=4.0, help="classifier-free guidance "
                            "(default 4.0; <= 1 disables it)")
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                            help="ONNX Runtime provider: auto picks the one the artifact was lowered for (its "
                                 "--target) when it is usable here, else TensorRT -> CUDA -> CPU; another provider "
                                 "than the target's runs, with one line saying what it costs")
    run_parser.add_argument("--trt-cache", type=Path, metavar="DIR", help="where the TensorRT provider keeps its "
                            "engines (default: ARTIFACT_DIR.trt-cache beside the artifact)")
    run_parser.add_argument("-o", "--output", type=Path, required=True, metavar="SAMPLES.npz")

    record_parser = commands.add_parser(
        "record", help="record a text-to-image pipeline's transformer inputs for --calibration-inputs",
        description="Runs the diffusers pipeline at PIPELINE_DIR (text encoder, tokenizer, scheduler, transformer; "
                    "no VAE) on the calibration prompts against the empty prompt, and writes every transformer "
                    "call's inputs to a safetensors file (text embeddings stored once per prompt), written "
                    "atomically. `ditq compile TRANSFORMER_DIR --calibration-inputs FILE` calibrates on it without "
                    "the text encoder.")
    record_parser.add_argument("pipeline", type=Path, metavar="PIPELINE_DIR")
    record_parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                               help="one prompt per line (default: ditq's calibration prompts)")
    record_parser.add_argument("--calib-steps", type=int, default=25, help="sampling steps per prompt (default 25)")
    record_parser.add_argument("--calib-samples", type=int, default=8, help="prompts per pipeline call (default 8)")
    record_parser.add_argument("--guidance-scale", type=float, default=4.0, help="classifier-free guidance "
                               "(default 4.0)")
    record_parser.add_argument("--seed", type=int, default=0, help="seed of the pipeline's noise")
    record_parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.safetensors")

    verify_parser = commands.add_parser(
        "verify", help="check an artifact's files against the sha256 in its manifest",
        description="Hashes every file of the artifact and compares it with its manifest (which is itself "
                    "sealed). Prints 'ok', or names the file that differs and exits with code 2.")
    verify_parser.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")

    lower_parser = commands.add_parser(
        "lower", help="re-lower an artifact for another target, without recalibrating",
        description="Raises ARTIFACT_DIR's model back to the canonical form (the inverse of each lowering pass "
                    "its manifest lists) and lowers it for --target. Activation parameters convert from the Q/DQ "
                    "scale and zero point alone (int8 symmetric for tensorrt; dropped for cuda), so the numerics "
                    "change; the new manifest records the agreement with the source artifact. A cpu-target "
                    "artifact can be re-lowered to any target; a cuda-target one cannot (recompile it).")
    lower_parser.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    lower_parser.add_argument("--target", required=True, choices=list(TARGETS))
    lower_parser.add_argument("-o", "--output", type=Path, required=True, metavar="NEW_ARTIFACT_DIR")
    lower_parser.add_argument("--force", action="store_true", help="replace NEW_ARTIFACT_DIR even when it is not "
                              "a ditq artifact, deleting its contents")
    lower_parser.add_argument("--dump-dir", type=Path, help="write every raising and lowering pass's dump there")
    return parser


_ACTIVITY_NAMES = {"compile": "compiling", "inspect": "inspecting", "run": "sampling", "verify": "verifying",
                   "lower": "lowering", "record": "recording"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .progress import heartbeat

    commands = {"compile": _compile, "inspect": _inspect, "run": _run, "verify": _verify, "lower": _lower,
                "record": _record}
    try:
        with heartbeat(_ACTIVITY_NAMES[args.command]):
            return commands[args.command](args)
    except DitqError as exc:
        print(f"ditq {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"ditq {args.command}: interrupted", file=sys.stderr)
        return 130


def _compile(args) -> int:
    from .pipeline import compile as compile_checkpoint

    config = _config_from(args)
    _check_compile_output(args.checkpoint, args.output, args.force)
    artifact = compile_checkpoint(args.checkpoint, args.output, config, dump_dir=args.dump_dir, force=args.force)
    size = sum((artifact.path / f).stat().st_size for f in artifact.manifest["files"]) / 1e6
    kernels = kernel_summary(artifact.manifest.get("fusion") or {})
    print(f"wrote {artifact.path} ({size:.2f} MB, {len(artifact.manifest['quantized_layers'])} quantized layers"
          + (f", {kernels}" if kernels else "") + ")")
    _print_phase_table(artifact.compile_log)
    return 0


def kernel_summary(fusion: dict) -> str:
    """What ONNX Runtime runs the quantized layers as, in words: integer kernels are "fused"; FP8 layers on the
    CPU run as float GEMMs on weights ONNX Runtime converts from FP8 at load (it has no FP8 GEMM there), which is
    said as such rather than counted as fused."""
    from .exporters.ort_inspect import FLOAT_GEMMS, FUSED_INT8_OPS

    kernels = fusion.get("kernels") or {}
    if not kernels:
        return ""
    integer = {op: n for op, n in kernels.items() if op in FUSED_INT8_OPS}
    floating = {op: n for op, n in kernels.items() if op in FLOAT_GEMMS}
    parts = []
    if integer:
        parts.append(f"{sum(integer.values())} fused by ONNX Runtime into integer kernels: {integer}")
    if floating:
        parts.append(f"{sum(floating.values())} run by ONNX Runtime as float GEMMs on weights it converts from FP8 "
                     f"at load (no FP8 GEMM on this provider; the gain is the stored size): {floating}")
    rest = {op: n for op, n in kernels.items() if op not in integer and op not in floating}
    if rest:
        parts.append(f"{sum(rest.values())} run as {rest}")
    return "; ".join(parts)


def _print_phase_table(compile_log: dict) -> None:
    """The compile's time by phase (``compile_log.json``'s ``phases``), as progress lines on stderr."""
    from .progress import emit, phase_table

    rows, total = compile_log.get("phases"), compile_log.get("compile_seconds")
    if not rows or not isinstance(total, (int, float)):
        return
    for line in phase_table(rows, float(total)):
        emit(line)


def _check_compile_output(checkpoint: Path, output: Path, force: bool) -> None:
    """Refuse a bad -o before a long compile, not after it: a directory that is not an artifact (unless
    --force), and the checkpoint itself or a directory holding it (even with --force)."""
    from .artifact import check_output_dir
    from .errors import ArtifactError

    destination = check_output_dir(output, force)
    source = checkpoint.resolve()
    if source == destination or destination in source.parents:
        raise ArtifactError(f"-o {output} would replace the checkpoint {checkpoint}; choose another -o")


def _inspect(args) -> int:
    from .inspect import inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, args.dump_dir, _config_from(args))
    print(report)
    return 0


def _run(args) -> int:
    import numpy as np

    from .artifact import Artifact
    from .images import save_grid

    from .limits import check_guidance_scale, check_seed
    from .progress import phase
    from .staging import write_error

    check_guidance_scale(args.guidance_scale)  # before hashing a large model, not after
    check_seed(args.seed)
    with phase("verifying the artifact"):
        artifact = Artifact.load(args.artifact)
    artifact.tensorrt_cache = args.trt_cache
    text_family = artifact.family.calibrates_through_pipeline
    if text_family and args.class_labels is not None or not text_family and args.prompt is not None:
        from .errors import ConfigError

        raise ConfigError(f"{artifact.model_config.get('_class_name', 'this model')} takes "
                          f"{'--prompt' if text_family else '--class-labels'}, not "
                          f"{'--class-labels' if text_family else '--prompt'}")
    choice = artifact.provider_choice(args.provider)
    if choice.note:
        print(f"ditq run: {choice.note}", file=sys.stderr)
    if text_family:
        return _run_pipeline(args, artifact, choice)
    args.class_labels = args.class_labels if args.class_labels is not None else [0]
    samples = artifact.sample(args.class_labels, steps=args.steps, guidance_scale=args.guidance_scale,
                              seed=args.seed, provider=args.provider, progress=True)
    output = args.output if args.output.suffix == ".npz" else args.output.with_suffix(".npz")
    message = f"wrote {output} ({samples.shape[0]} samples, provider {choice.provider})"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        np.savez(output, samples=samples.numpy(), class_labels=np.asarray(args.class_labels, dtype=np.int64))
        if samples.shape[1] in (1, 3):
            png = output.with_suffix(".png")
            save_grid(samples, png, labels=[f"class {label}" for label in args.class_labels])
            message += f" and {png}"
    except OSError as exc:
        raise write_error(exc, "the samples") from None
    print(message)
    return 0


def _run_pipeline(args, artifact, choice) -> int:
    """``ditq run`` for a text-to-image artifact: the user's diffusers pipeline with the artifact as its transformer."""
    from .deploy import generate_with_pipeline
    from .staging import write_error

    if not args.prompt:
        from .errors import ConfigError

        raise ConfigError("give --prompt: a text-to-image model generates one image per prompt")
    images = generate_with_pipeline(artifact, args.pipeline, args.prompt, steps=args.steps,
                                    guidance_scale=args.guidance_scale, seed=args.seed, provider=args.provider)
    output = args.output if args.output.suffix == ".npz" else args.output.with_suffix(".npz")
    try:
        written = save_images(images, args.prompt, output)
    except OSError as exc:
        raise write_error(exc, "the images") from None
    print(f"wrote {output} ({len(args.prompt)} images, provider {choice.provider}) and {', '.join(map(str, written))}")
    return 0


def save_images(images, prompts: list[str], output: Path) -> list[Path]:
    """``images`` [N, H, W, C] in [0, 1] (C 1 or 3) to ``output`` (.npz with the prompts) and one PNG per prompt
    beside it."""
    import numpy as np
    from PIL import Image

    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(output, images=images, prompts=np.asarray(prompts))
    written = []
    for index, image in enumerate(images):
        png = output.with_name(f"{output.stem}_{index}.png")
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(png)
        written.append(png)
    return written


def _record(args) -> int:
    from .deploy import record_to_file

    path, count = record_to_file(args.pipeline, args.output, prompts_file=args.prompts, steps=args.calib_steps,
                                 samples=args.calib_samples, guidance_scale=args.guidance_scale, seed=args.seed)
    size = path.stat().st_size / 1e6
    print(f"wrote {path} ({count} transformer calls, {size:.2f} MB)")
    return 0


def _lower(args) -> int:
    from .relower import relower

    artifact = relower(args.artifact, args.target, args.output, force=args.force, dump_dir=args.dump_dir)
    numerics = artifact.manifest["numerics"]
    size = sum((artifact.path / f).stat().st_size for f in artifact.manifest["files"]) / 1e6
    print(f"wrote {artifact.path} ({args.target} target, {size:.2f} MB; vs the source artifact: relative L2 "
          f"{numerics['relative_l2']:.2e})")
    return 0


def _verify(args) -> int:
    from .artifact import Artifact

    Artifact.load(args.artifact, verify=True)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
