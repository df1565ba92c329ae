"""PixArt-α/Σ end to end through the user's diffusers pipeline, on tiny pipelines built in code (pixart_fixtures).

Calibration records the pipeline's transformer calls (text encoder, guidance against the empty prompt) and replays
them; every format compiles with every recipe on PixArt-α and PixArt-Σ, with 1 and 3 timestep groups; each artifact
passes onnx.checker, ONNX Runtime fuses every quantized layer in every branch, and ONNX Runtime matches the torch
fake-quant graph. The artifact drops into the pipeline as ``pipe.transformer`` and generates what the same pipeline
generates with the torch graph. Bad input (no text encoder, random or mismatched recorded embeddings) is one line,
exit code 2.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from ditq_compiler import CalibrationConfig, CompileConfig, OrtTransformer
from ditq_compiler.cli import main
from ditq_compiler.exporters import fusion_report
from ditq_compiler.numerics import agreement
from ditq_compiler.exporters.lowering import LayerRecord
from pixart_fixtures import make_tiny_pixart_pipeline, save_tiny_pixart_pipeline

FORMATS = ["w8a8", "w4a8", "fp8", "fp4"]
RECIPES = ["minmax", "smoothquant", "ptq4dit", "htg", "vidit", "dilate"]
VARIANTS = ("alpha", "sigma")
# (variant, format, recipe, timestep groups): PixArt-α and PixArt-Σ (the same transformer class behind another
# pipeline, text length and position-embedding scale), every format with every recipe, with 1 group and with 3
# (branches and If dispatch). Each case is a compile: ~8 s on 2 cores for one group, ~12 s for three (the branches
# share one ONNX export).
GRID = [(variant, fmt, recipe, groups) for variant in VARIANTS for groups in (1, 3) for fmt in FORMATS
        for recipe in RECIPES]
CALIB_PROMPTS = ["a red fox in the snow", "a city at night, neon lights", "a bowl of ramen", "sunset"]


@pytest.fixture(scope="session")
def pixart_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart")
    return {variant: save_tiny_pixart_pipeline(root / variant, variant) for variant in VARIANTS}


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# calibration prompts\n" + "\n".join(CALIB_PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="session")
def recordings(pixart_dirs, prompts_file, tmp_path_factory):
    """``ditq record`` of each pipeline: 4 prompts, 5 steps (every one of 3 uniform groups gets a step), 2 prompts
    per call."""
    root = tmp_path_factory.mktemp("recordings")
    files = {}
    for variant, directory in pixart_dirs.items():
        files[variant] = root / f"{variant}.safetensors"
        assert main(["record", str(directory), "--prompts", str(prompts_file), "--calib-steps", "5",
                     "--calib-samples", "2", "-o", str(files[variant])]) == 0
    return files


_COMPILED: dict = {}


def _compiled(pixart_dirs, recordings, tmp_path_factory, variant, fmt, recipe, groups):
    key = (variant, fmt, recipe, groups)
    if key not in _COMPILED:
        from ditq_compiler.pipeline import compile_with_result

        config = CompileConfig(format=fmt, recipe=recipe, groups=groups,
                               calibration=CalibrationConfig(steps=5, samples=2, inputs=str(recordings[variant])))
        out = tmp_path_factory.mktemp(f"{variant}-{fmt}-{recipe}-{groups}") / "artifact"
        _COMPILED[key] = compile_with_result(pixart_dirs[variant] / "transformer", out, config)
    return _COMPILED[key]


def test_a_recording_holds_every_call_and_each_prompt_once(pixart_dirs, recordings):
    from ditq_compiler.families import PIXART
    from ditq_compiler.loading import load_checkpoint
    from ditq_compiler.recording import load_recording

    loaded = load_checkpoint(pixart_dirs["alpha"])
    recording = load_recording(recordings["alpha"], PIXART, loaded.model_config, loaded.scheduler_config)
    assert len(recording) == 2 * 5  # 2 pipeline calls of 2 prompts x 5 steps
    assert recording.rows["encoder_hidden_states"].shape[0] == len(CALIB_PROMPTS) + 1  # + the empty prompt
    assert recording.source["pipeline"] == "PixArtAlphaPipeline" and recording.source["prompts"] == 4
    timestep, (latent, text, t, mask) = next(iter(recording))
    assert latent.shape == (4, 4, 8, 8) and text.shape == (4, 120, 32) and mask.shape == (4, 120)
    assert bool((t == timestep).all()) and t.dtype == torch.int64
    # the unconditional half first, as the pipeline batches it: the empty prompt has one token (</s>)
    assert mask[:2].sum(dim=1).tolist() == [1, 1] and bool((mask[2:].sum(dim=1) > 1).all())


@pytest.mark.slow
@pytest.mark.parametrize("variant, fmt, recipe, groups", GRID)
def test_every_format_and_recipe_compiles_fused_and_matches_torch(variant, fmt, recipe, groups, pixart_dirs,
                                                                  recordings, tmp_path_factory):
    artifact, result = _compiled(pixart_dirs, recordings, tmp_path_factory, variant, fmt, recipe, groups)
    onnx.checker.check_model(str(artifact.model_path), full_check=True)
    assert artifact.manifest["model"]["class"] == "PixArtTransformer2DModel"
    assert list(artifact.manifest["inputs"]) == ["sample", "encoder_hidden_states", "timestep",
                                                 "encoder_attention_mask"]
    layers = {key: LayerRecord.from_manifest(record) for key, record in artifact.manifest["layers"].items()}
    report = fusion_report(artifact.model_path, layers)  # the lowered weights (FP8's folded ones included)
    assert report.all_fused, report.unfused
    assert set(report.readers.values()) == {groups}  # every quantized layer fused in every branch
    # per block: q, k, v, out, cross q, k, v, out, fc1, fc2; and adaln_single.linear
    assert len(artifact.manifest["quantized_layers"]) == 2 * 10 + 1
    # ONNX Runtime against the torch fake-quant graph on recorded calls of every group (the compile refuses an
    # artifact that disagrees; checked here on rows of its own choosing too)
    for group, rows in result.context.check_inputs_by_group(per_group=2).items():
        for inputs in rows:
            with torch.no_grad():
                expected = result.graph_module(*inputs).numpy()
            got = artifact.denoise(*inputs, provider="cpu")
            match = agreement(got, expected)
            assert match.ok, (variant, fmt, recipe, group, match.describe())
    if recipe != "minmax":
        fold = next(p for p in artifact.manifest["passes"] if p["name"] == "fold_smoothing")
        assert fold["summary"] and fold["summary"] != "nothing to fold"


def test_a_pipeline_directory_calibrates_through_the_pipeline_on_the_shipped_prompts(pixart_dirs, tmp_path):
    from ditq_compiler.pipeline import compile_with_result
    from ditq_compiler.prompts import CALIBRATION_PROMPTS

    assert len(CALIBRATION_PROMPTS) >= 64 and len(set(CALIBRATION_PROMPTS)) == len(CALIBRATION_PROMPTS)
    config = CompileConfig(calibration=CalibrationConfig(steps=2, samples=16))
    artifact, result = compile_with_result(pixart_dirs["alpha"], tmp_path / "artifact", config)
    source = artifact.manifest["calibration_recording"]
    assert source["pipeline"] == "PixArtAlphaPipeline" and source["text_encoder"] == "T5EncoderModel"
    assert source["prompts"] == len(CALIBRATION_PROMPTS)
    assert source["calls"] == 2 * -(-len(CALIBRATION_PROMPTS) // 16)
    calibrate = next(p for p in artifact.manifest["passes"] if p["name"] == "calibrate")
    assert "recorded transformer calls of the diffusers pipeline" in calibrate["summary"]


def test_the_artifact_is_a_drop_in_for_pipe_transformer(pixart_dirs, recordings, tmp_path_factory):
    """``pipe.transformer = OrtTransformer.from_artifact(DIR)`` generates what the same pipeline generates with the
    torch fake-quant graph (same seed); pixel values in [0, 1], measured difference ~3e-7."""
    from diffusers import DiffusionPipeline
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    artifact, result = _compiled(pixart_dirs, recordings, tmp_path_factory, "alpha", "w8a8", "smoothquant", 3)
    pipe = DiffusionPipeline.from_pretrained(str(pixart_dirs["alpha"]))
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(prompt=["a red fox in the snow", "a lighthouse in a storm"], num_inference_steps=6,
                    generator=torch.Generator().manual_seed(3), output_type="np", clean_caption=False,
                    use_resolution_binning=False).images

    float_images = generate()
    pipe.transformer = OrtTransformer.from_graph(result.graph_module, result.context.family, result.context.model_config)
    torch_images = generate()
    pipe.transformer = OrtTransformer.from_artifact(artifact.path, provider="cpu")
    ort_images = generate()
    assert ort_images.shape == float_images.shape == (2, 8, 8, 3)
    assert np.abs(ort_images - torch_images).max() <= 1e-4
    assert 0 < np.abs(ort_images - float_images).max() < 0.5  # quantized, and still the same images

    latent, text, timestep, mask = result.context.check_inputs
    output = pipe.transformer(latent, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=timestep,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    assert isinstance(output, Transformer2DModelOutput) and output.sample.shape == (2, 8, 8, 8)
    assert pipe.transformer(latent, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=timestep,
                            return_dict=False)[0].shape == (2, 8, 8, 8)
    with pytest.raises(Exception, match="max_sequence_length=120"):
        pipe.transformer(latent, encoder_hidden_states=text[:, :60], encoder_attention_mask=mask[:, :60],
                         timestep=timestep)


def test_pixart_alpha_1024_takes_its_resolution_and_aspect_ratio(prompts_file, tmp_path):
    """PixArt-α 1024 (sample size 128: ``use_additional_conditions``) takes ``added_cond_kwargs`` (resolution and
    aspect ratio): two more inputs of role ``size``, recorded from the pipeline, traced as the dict's entries, and
    taken back from the pipeline's ``added_cond_kwargs`` by the drop-in. Tiny: patch 8, so 128x128 latents are 256
    tokens."""
    from diffusers import DiffusionPipeline

    from ditq_compiler.pipeline import compile_with_result

    directory = save_tiny_pixart_pipeline(tmp_path / "alpha-1024", "alpha", sample_size=128, patch_size=8,
                                          use_additional_conditions=None)  # diffusers: on at sample size 128
    config = CompileConfig(calibration=CalibrationConfig(steps=3, samples=2, prompts=str(prompts_file)))
    artifact, result = compile_with_result(directory, tmp_path / "artifact", config)
    assert list(artifact.manifest["inputs"])[-2:] == ["resolution", "aspect_ratio"]
    assert artifact.manifest["inputs"]["resolution"]["kwarg"] == "added_cond_kwargs.resolution"
    assert artifact.manifest["fusion"]["unfused"] == {}
    resolution = result.context.check_inputs[4]
    assert resolution.shape == (2, 2) and bool((resolution == 128).all())  # the pipeline's image size, recorded

    pipe = DiffusionPipeline.from_pretrained(str(directory))
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(prompt=["a red fox in the snow"], num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                    output_type="np", clean_caption=False, use_resolution_binning=False).images

    pipe.transformer = OrtTransformer.from_graph(result.graph_module, result.context.family, result.context.model_config)
    torch_images = generate()
    pipe.transformer = OrtTransformer.from_artifact(artifact.path, provider="cpu")
    ort_images = generate()
    assert ort_images.shape == (1, 128, 128, 3) and np.abs(ort_images - torch_images).max() <= 1e-4
    latent, text, timestep, mask, _, _ = result.context.check_inputs
    with pytest.raises(Exception, match="did not pass added_cond_kwargs.resolution"):
        pipe.transformer(latent, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=timestep)


def test_cli_record_compile_and_run_with_a_prompt(pixart_dirs, recordings, prompts_file, tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["compile", str(pixart_dirs["sigma"] / "transformer"), "-o", str(out), "--calib-steps", "3",
                 "--calibration-inputs", str(recordings["sigma"])]) == 0
    assert main(["run", str(out), "--prompt", "a red fox", "a city", "--steps", "4", "--pipeline",
                 str(pixart_dirs["sigma"]), "-o", str(tmp_path / "images.npz")]) == 0
    saved = np.load(tmp_path / "images.npz")
    assert saved["images"].shape == (2, 8, 8, 3) and list(saved["prompts"]) == ["a red fox", "a city"]
    assert (tmp_path / "images_0.png").is_file() and (tmp_path / "images_1.png").is_file()
    assert "2 images" in capsys.readouterr().out


def test_a_pipeline_without_vae_generates_pixels_and_a_latent_model_needs_one(pixart_dirs, recordings,
                                                                              prompts_file, tmp_path_factory,
                                                                              tmp_path, capsys):
    """A pixel-space model ships without a VAE (``model_index.json`` lists it as ``[null, null]``, as ditq's reference
    PixArt does): the pipeline loads with ``vae=None`` for calibration and for ``ditq run``, and its latents, in
    [-1, 1], are the images (grayscale PNGs). A latent-space model's pipeline without a VAE is refused in one line."""
    pixels = save_tiny_pixart_pipeline(tmp_path / "pixels", "alpha", with_vae=False, in_channels=1, out_channels=2)
    assert json.loads((pixels / "model_index.json").read_text())["vae"] == [None, None]
    out = tmp_path / "artifact"
    assert main(["compile", str(pixels), "-o", str(out), "--prompts", str(prompts_file), "--calib-steps", "2",
                 "--calib-samples", "2"]) == 0
    assert main(["run", str(out), "--prompt", "a red fox", "sunset", "--steps", "3", "-o",
                 str(tmp_path / "images.npz")]) == 0
    images = np.load(tmp_path / "images.npz")["images"]
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    from PIL import Image

    assert Image.open(tmp_path / "images_0.png").mode == "L"
    latent_without_vae = tmp_path / "no-vae"
    save_tiny_pixart_pipeline(latent_without_vae, "alpha", with_vae=False)
    artifact, _ = _compiled(pixart_dirs, recordings, tmp_path_factory, "alpha", "w8a8", "minmax", 1)
    capsys.readouterr()
    assert main(["run", str(artifact.path), "--prompt", "a cat", "--pipeline", str(latent_without_vae), "-o",
                 str(tmp_path / "x.npz")]) == 2
    assert "has no VAE to decode the model's 4-channel latents" in _one_line_error(capsys)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_transformer_directory_or_pipeline_without_encoder_is_refused_before_work(pixart_dirs, tmp_path, capsys):
    assert main(["compile", str(pixart_dirs["alpha"] / "transformer"), "-o", str(tmp_path / "a")]) == 2
    assert "no text encoder to calibrate with" in _one_line_error(capsys)
    bare = tmp_path / "bare"
    pipe = make_tiny_pixart_pipeline("alpha", with_encoder=False)
    pipe.save_pretrained(str(bare))
    assert main(["compile", str(bare), "-o", str(tmp_path / "b")]) == 2
    assert "--calibration-inputs" in _one_line_error(capsys)
    assert main(["record", str(bare), "-o", str(tmp_path / "r.safetensors")]) == 2
    assert "no text encoder" in _one_line_error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _rewritten(recording_file, tmp_path, change):
    """A copy of a recording with ``change`` applied to its tensors (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(recording_file), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    change(tensors)
    path = tmp_path / "changed.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_random_or_mismatched_embeddings_are_refused_in_one_line(pixart_dirs, recordings, tmp_path, capsys):
    transformer = str(pixart_dirs["alpha"] / "transformer")

    def randomize(tensors):
        text = tensors["rows.encoder_hidden_states"]
        tensors["rows.encoder_hidden_states"] = torch.randn(text.shape, generator=torch.Generator().manual_seed(0))

    def narrow(tensors):
        tensors["rows.encoder_hidden_states"] = tensors["rows.encoder_hidden_states"][..., :16].contiguous()

    def past_the_rows(tensors):
        tensors["call.00003.encoder_hidden_states.index"] = tensors["call.00003.encoder_hidden_states.index"] + 100

    for change, message in ((randomize, "text embeddings look random"),
                            (narrow, "encoder_hidden_states has caption_channels 16, the model takes 32"),
                            (past_the_rows, "call 3 is incomplete or points past its rows")):
        recording = _rewritten(recordings["alpha"], tmp_path, change)
        assert main(["compile", transformer, "-o", str(tmp_path / "x"), "--calibration-inputs", str(recording)]) == 2
        assert message in _one_line_error(capsys)
    not_a_recording = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(not_a_recording))
    assert main(["compile", transformer, "-o", str(tmp_path / "x"), "--calibration-inputs",
                 str(not_a_recording)]) == 2
    assert "not a recording of transformer calls" in _one_line_error(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["compile", str(pixart_dirs["alpha"]), "-o", str(tmp_path / "x"), "--prompts", str(empty)]) == 2
    assert "holds no prompt" in _one_line_error(capsys)
    assert not (tmp_path / "x").exists()


def test_run_asks_a_text_model_for_prompts_and_a_class_model_for_labels(pixart_dirs, recordings, compiled_tiny,
                                                                       prompts_file, tmp_path_factory, tmp_path,
                                                                       capsys):
    artifact, _ = _compiled(pixart_dirs, recordings, tmp_path_factory, "sigma", "w8a8", "minmax", 1)
    capsys.readouterr()  # the compile's progress, where this test compiled it
    assert main(["run", str(artifact.path), "--class-labels", "1", "-o", str(tmp_path / "x.npz")]) == 2
    assert "takes --prompt, not --class-labels" in _one_line_error(capsys)
    assert main(["run", str(compiled_tiny[0].path), "--prompt", "a cat", "-o", str(tmp_path / "y.npz")]) == 2
    assert "takes --class-labels, not --prompt" in _one_line_error(capsys)
    dit = str(compiled_tiny[0].manifest["source"]["path"])
    assert main(["compile", dit, "-o", str(tmp_path / "z"), "--prompts", str(prompts_file)]) == 2
    assert "--prompts and --calibration-inputs are for text-to-image models" in _one_line_error(capsys)
    assert main(["lower", str(artifact.path), "--target", "tensorrt", "-o", str(tmp_path / "low")]) == 2
    assert "recompile it from the pipeline with --target tensorrt" in _one_line_error(capsys)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["calibration_recording"]["prompts"] == len(CALIB_PROMPTS)
