"""The ``ditq`` command line: compile, inspect, run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import FORMATS, GROUPINGS, RECIPES, CalibrationConfig, CompileConfig, LayerRule
from .errors import DitqError

DESCRIPTION = """\
ditq compiles a Diffusion Transformer checkpoint into a quantized ONNX artifact that ONNX Runtime runs
on fused int8 kernels.

CHECKPOINT is a diffusers DiTTransformer2DModel directory (config.json + safetensors), a diffusers
pipeline directory (transformer/ and optionally scheduler/), or an original facebookresearch DiT .pt
state dict. Nothing in a checkpoint is executed: weights are read with safetensors or
torch.load(weights_only=True).

examples:
  ditq compile models/dit-digits -o out/dit-digits-w8a8 --format w8a8 --recipe minmax
  ditq inspect models/dit-digits --dump-dir out/dumps
  ditq run out/dit-digits-w8a8 --steps 50 --class-labels 1 3 --seed 0 -o out/samples.npz
"""


def _formats_help() -> str:
    return "; ".join(f"{n}: {s.description}{'' if s.implemented else ' (not yet)'}" for n, s in FORMATS.items())


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="diffusers DiT directory or original DiT .pt")
    parser.add_argument("--format", default="w8a8", metavar="FORMAT", help=f"number format. {_formats_help()}")
    parser.add_argument("--recipe", default="minmax", metavar="RECIPE",
                        help="how quantization parameters are chosen. " +
                             "; ".join(f"{n}: {d}" for n, d in RECIPES.items()))
    parser.add_argument("--layer", action="append", default=[], metavar="PATTERN=int8|fp",
                        help="quantize (int8) or keep in float (fp) the linear layers whose module name matches "
                             "the glob PATTERN, e.g. 'transformer_blocks.0.*=fp'. Repeatable; applied after the "
                             "default set (every block linear and adaLN modulation), later rules win. A pattern "
                             "that matches nothing is an error.")
    parser.add_argument("--calib-steps", type=int, default=25, help="sampling steps of each calibration "
                        "trajectory (default 25, as PTQ4DiT)")
    parser.add_argument("--calib-samples", type=int, default=8, help="(noise, class) pairs calibrated on "
                        "(default 8); each runs with its classifier-free-guidance twin")
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


def _config_from(args) -> CompileConfig:
    return CompileConfig(
        format=args.format, recipe=args.recipe,
        layer_rules=tuple(LayerRule.parse(text) for text in args.layer),
        calibration=CalibrationConfig(steps=args.calib_steps, samples=args.calib_samples,
                                      guidance_scale=args.guidance_scale, seed=args.seed),
        groups=args.groups, grouping=args.grouping,
        verify_fusion=not args.no_verify,
    ).validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditq", description=DESCRIPTION,
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
    compile_parser.add_argument("-o", "--output", type=Path, required=True, metavar="ARTIFACT_DIR")
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
        description="Runs the sampling loop of the artifact's scheduler (classifier-free guidance as DiT) and "
                    "saves the samples as .npz (arrays 'samples' [N, C, H, W] and 'class_labels'), plus a PNG "
                    "grid beside it when the model has 1 or 3 channels.")
    run_parser.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    run_parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    run_parser.add_argument("--class-labels", type=int, nargs="+", default=[0], help="one sample per label")
    run_parser.add_argument("--guidance-scale", type=float, default=4.0, help="classifier-free guidance "
                            "(default 4.0; <= 1 disables it)")
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--provider", choices=["auto", "cuda", "cpu"], default="auto",
                            help="ONNX Runtime provider: auto picks CUDA when it is usable, else CPU")
    run_parser.add_argument("-o", "--output", type=Path, required=True, metavar="SAMPLES.npz")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compile":
            return _compile(args)
        if args.command == "inspect":
            return _inspect(args)
        return _run(args)
    except DitqError as exc:
        print(f"ditq {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"ditq {args.command}: interrupted", file=sys.stderr)
        return 130


def _compile(args) -> int:
    from .pipeline import compile as compile_checkpoint

    config = _config_from(args)
    artifact = compile_checkpoint(args.checkpoint, args.output, config, dump_dir=args.dump_dir)
    fusion = artifact.manifest.get("fusion") or {}
    size = sum((artifact.path / f).stat().st_size for f in artifact.manifest["files"]) / 1e6
    print(f"wrote {artifact.path} ({size:.2f} MB, {len(artifact.manifest['quantized_layers'])} quantized layers"
          + (f", {fusion['fused_layers']} fused by ONNX Runtime: {fusion['kernels']}" if fusion else "") + ")")
    return 0


def _inspect(args) -> int:
    from .inspect import inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, args.dump_dir, _config_from(args))
    print(report)
    return 0


def _run(args) -> int:
    import numpy as np

    from .artifact import Artifact
    from .images import save_grid

    artifact = Artifact.load(args.artifact)
    samples = artifact.sample(args.class_labels, steps=args.steps, guidance_scale=args.guidance_scale,
                              seed=args.seed, provider=args.provider, progress=True)
    output = args.output if args.output.suffix == ".npz" else args.output.with_suffix(".npz")
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(output, samples=samples.numpy(), class_labels=np.asarray(args.class_labels, dtype=np.int64))
    message = f"wrote {output} ({samples.shape[0]} samples, provider {artifact.session(args.provider).get_providers()[0]})"
    if samples.shape[1] in (1, 3):
        png = output.with_suffix(".png")
        save_grid(samples, png, labels=args.class_labels)
        message += f" and {png}"
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
