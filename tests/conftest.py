"""Shared fixtures: tiny diffusers DiTs built in code, and one compiled artifact reused by e2e tests."""

from __future__ import annotations

import json

import pytest
import torch

TINY_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
    sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,
)
LAYERS_PER_BLOCK = 7  # q, k, v, out, fc1, fc2, adaLN modulation
QUANTIZED_INPUTS_PER_BLOCK = 5  # adaLN input, qkv input (shared), out input, fc1 input, fc2 input
ATTENTION_TENSORS_PER_BLOCK = 4  # q, k, v and the softmax output (--quantize-attention)


def example_inputs(config: dict, batch: int = 2, seed: int = 0):
    """DiT's example denoiser inputs ``(sample, timestep, class_labels)``."""
    from ditq_compiler.families import DIT

    return DIT.example_inputs(config, batch=batch, seed=seed)


def trace_dit(model, inputs, **options):
    from ditq_compiler.families import DIT
    from ditq_compiler.tracing import trace_model

    return trace_model(model, DIT, dict(model.config), inputs, **options)


def input_keys_by_role(gm) -> dict[str, list[str]]:
    """role -> the distinct input keys of the annotated linears of that role, in graph order."""
    from ditq_compiler.qspec import SPEC_KEY

    keys: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(SPEC_KEY)
        if spec is not None and spec.input_key not in keys.get(spec.role, []):
            keys.setdefault(spec.role, []).append(spec.input_key)
    return keys


def make_tiny_dit(seed: int = 0, **overrides):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**TINY_CONFIG, **overrides}).eval()
    # adaLN-zero initialises the modulation and final layer to zero; give them weights so every path
    # carries signal (a trained model's do).
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.abs().sum() == 0 and parameter.dim() == 2:
                parameter.normal_(0, 0.02)
    return model


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_dit")
    make_tiny_dit().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    from diffusers import DDIMScheduler

    path = tmp_path_factory.mktemp("tiny_pipeline")
    make_tiny_dit(seed=1).save_pretrained(path / "transformer", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="session")
def fast_config():
    from ditq_compiler import CalibrationConfig, CompileConfig

    return CompileConfig(calibration=CalibrationConfig(steps=6, samples=2))


@pytest.fixture(scope="session")
def compiled_tiny(tiny_dit_dir, fast_config, tmp_path_factory):
    """(artifact, pipeline result) of the tiny DiT, compiled once for the session."""
    from ditq_compiler.pipeline import compile_with_result

    out = tmp_path_factory.mktemp("artifacts") / "tiny-w8a8"
    return compile_with_result(tiny_dit_dir, out, fast_config)


def read_json(path):
    return json.loads(path.read_text())


REFERENCE_MODEL = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "dit-digits"


@pytest.fixture(scope="session")
def reference_artifact(tmp_path_factory):
    """The bundled reference DiT compiled to W8A8 with the CLI's default settings."""
    from ditq_compiler import compile as compile_checkpoint

    return compile_checkpoint(REFERENCE_MODEL, tmp_path_factory.mktemp("reference") / "dit-digits-w8a8")


# The modules whose tests compile models by the dozen (format x recipe grids, kill trials, the reference models,
# reconstruction): `pytest -m "not slow"` leaves them out for a fast development loop; CI runs everything.
SLOW_MODULES = frozenset({
    "test_attention", "test_dedup", "test_end_to_end", "test_faults", "test_formats", "test_pixart",
    "test_pixart_folds", "test_reconstruct", "test_reference_model", "test_smoothing", "test_targets",
    "test_timestep_groups",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
