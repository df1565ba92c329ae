"""The ``ditq`` command line, including one clear line and a non-zero exit for each bad input."""

import json

import numpy as np
import pytest

from ditq_compiler.cli import main

FAST = ["--calib-steps", "4", "--calib-samples", "2"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_help_explains_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("compile", "inspect", "run", "weights_only", "examples:"):
        assert word in out


def test_compile_run_inspect(tiny_dit_dir, tmp_path, capsys):
    artifact = tmp_path / "art"
    assert main(["compile", str(tiny_dit_dir), "-o", str(artifact), "--format", "w8a8", "--recipe", "minmax",
                 *FAST]) == 0
    assert "14 fused by ONNX Runtime" in capsys.readouterr().out
    samples = tmp_path / "samples.npz"
    assert main(["run", str(artifact), "--steps", "3", "--class-labels", "1", "3", "--seed", "0",
                 "-o", str(samples), "--provider", "cpu"]) == 0
    data = np.load(samples)
    assert data["samples"].shape == (2, 4, 8, 8) and data["class_labels"].tolist() == [1, 3]
    assert not samples.with_suffix(".png").exists()  # 4-channel latents: no image grid
    dumps = tmp_path / "dumps"
    assert main(["inspect", str(tiny_dit_dir), "--dump-dir", str(dumps), *FAST]) == 0
    names = {p.name for p in dumps.iterdir()}
    assert any(name.endswith("_insert_qdq.txt") for name in names)
    assert {"000_traced.txt", "timings.txt", "model.onnx", "ort_optimized.txt",
            "layer_error.txt", "layer_error.png"} <= names
    assert "fused into int8 kernels: 14 of 14" in (dumps / "ort_optimized.txt").read_text()


def test_layer_rule_from_the_command_line(tiny_dit_dir, tmp_path):
    artifact = tmp_path / "art"
    assert main(["compile", str(tiny_dit_dir), "-o", str(artifact), *FAST,
                 "--layer", "transformer_blocks.1.*=fp", "--layer", "proj_out_2=int8"]) == 0
    layers = json.loads((artifact / "manifest.json").read_text())["quantized_layers"]
    assert "proj_out_2" in layers and not any(name.startswith("transformer_blocks.1.") for name in layers)


def test_quantize_embedders_from_the_command_line(tiny_dit_dir, tmp_path):
    artifact = tmp_path / "art"
    assert main(["compile", str(tiny_dit_dir), "-o", str(artifact), *FAST, "--quantize-embedders"]) == 0
    manifest = json.loads((artifact / "manifest.json").read_text())
    layers = manifest["quantized_layers"]
    assert {"proj_out_1", "proj_out_2"} <= set(layers)
    assert any(".norm1.emb.timestep_embedder.linear_1" in name for name in layers)
    assert manifest["quantize_embedders"] is True
    assert manifest["fusion"]["fused_layers"] == len(layers)  # every one an integer kernel


@pytest.mark.parametrize("args, message", [
    (["compile", "/no/such/dit", "-o", "OUT"], "checkpoint not found"),
    (["compile", "TINY", "-o", "OUT", "--format", "w3a1"], "unknown format 'w3a1'"),
    (["compile", "TINY", "-o", "OUT", "--format", "fp4", "--target", "tensorrt"], "--target tensorrt does not take fp4"),
    (["compile", "TINY", "-o", "OUT", "--layer", "*.ff.*=int3"], "must look like PATTERN=int8|int4|fp8|fp4|fp"),
    (["compile", "TINY", "-o", "OUT", "--rotate", "givens"], "unknown --rotate 'givens'"),
    (["compile", "TINY", "-o", "OUT", "--weight-clip", "max"], "unknown --weight-clip 'max'"),
    (["compile", "TINY", "-o", "OUT", "--format", "w4a8", "--weight-block", "48"], "--weight-block must be one of 32, 64, 128"),
    (["compile", "TINY", "-o", "OUT", "--format", "fp8", "--act", "dynamic"], "--act dynamic applies to int8 and int4"),
    (["compile", "TINY", "-o", "OUT", "--recipe", "secret"], "unknown recipe 'secret'"),
    (["compile", "TINY", "-o", "OUT", "--reconstruct", "gptq", "--reconstruct-iters", "-1"],
     "--reconstruct-iters must be at least 0"),
    (["compile", "TINY", "-o", "OUT", "--reconstruct", "adaquant"], "adaquant"),
    (["compile", "TINY", "-o", "OUT", "--format", "fp8", "--quantize-attention"],
     "--quantize-attention needs static integer activations"),
    (["compile", "TINY", "-o", "OUT", "--layer", "blocks.*=fp", *FAST], "matches no linear layer"),
    (["compile", "TINY", "-o", "OUT", "--calib-steps", "0"], "--calib-steps must be at least 1"),
    (["run", "/no/such/artifact", "-o", "s.npz"], "artifact directory not found"),
])
def test_bad_input_gives_one_line_and_exit_2(args, message, tiny_dit_dir, tmp_path, capsys):
    args = [str(tiny_dit_dir) if a == "TINY" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(args) == 2
    line = _error_line(capsys)
    assert line.startswith(f"ditq {args[0]}: error: ") and message in line
    assert not (tmp_path / "out").exists()


def test_bad_class_label_and_provider(compiled_tiny, tmp_path, capsys):
    artifact, _ = compiled_tiny
    assert main(["run", str(artifact.path), "--class-labels", "10", "-o", str(tmp_path / "s.npz")]) == 2
    assert "class label 10 is outside [0, 9]" in _error_line(capsys)
    from ditq_compiler.runtime import cuda_usable

    if not cuda_usable()[0]:
        assert main(["run", str(artifact.path), "--provider", "cuda", "-o", str(tmp_path / "s.npz")]) == 2
        assert "--provider cuda:" in _error_line(capsys)


def test_sample_grids_wrap_at_eight_and_label_every_image(tmp_path):
    import torch
    from PIL import Image

    from ditq_compiler.images import LABEL_HEIGHT, save_grid

    samples = torch.ones(10, 1, 16, 16)  # white images: any dark pixel below them is a label
    save_grid(samples, tmp_path / "labelled.png", labels=[f"class {i}" for i in range(10)])
    save_grid(samples, tmp_path / "plain.png")
    labelled = np.asarray(Image.open(tmp_path / "labelled.png"))
    plain = np.asarray(Image.open(tmp_path / "plain.png"))
    assert labelled.shape[1] == plain.shape[1] and labelled.shape[0] == plain.shape[0] + 2 * LABEL_HEIGHT
    cell = (16 + 2) * 4
    for index in range(10):
        row, column = divmod(index, 8)
        top = (row + 1) * cell + row * LABEL_HEIGHT
        strip = labelled[top:top + LABEL_HEIGHT, column * cell:(column + 1) * cell]
        assert (strip < 128).any(), f"no label under image {index}"
