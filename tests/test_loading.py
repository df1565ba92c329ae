import argparse
import collections
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from conftest import make_tiny_dit
from ditq_compiler.errors import CheckpointError, ConfigError
from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG, load_checkpoint


def _same_function(a, b, config) -> float:
    """Max |a - b| of one denoiser call on random inputs, relative to max |b|."""
    from conftest import example_inputs

    x, t, y = example_inputs(config, batch=3)
    with torch.no_grad():
        out_a, out_b = a(x, t, y).sample, b(x, t, y).sample
    return float((out_a - out_b).abs().max() / out_b.abs().max())


def test_diffusers_dir_with_default_scheduler(tiny_dit_dir):
    loaded = load_checkpoint(tiny_dit_dir)
    assert loaded.model_class == "DiTTransformer2DModel"
    assert loaded.scheduler_config == DEFAULT_SCHEDULER_CONFIG
    assert len(loaded.sha256) == 64
    assert _same_function(loaded.model, make_tiny_dit(), loaded.model_config) == 0.0


def test_pipeline_layout_takes_its_scheduler(tiny_pipeline_dir):
    loaded = load_checkpoint(tiny_pipeline_dir)
    assert loaded.scheduler_config["_class_name"] == "DDIMScheduler"


def _original_state_dict(model) -> dict:
    """The inverse of diffusers' DiT conversion, for a model whose blocks share one embedder."""
    sd = model.state_dict()
    depth = model.config.num_layers
    emb = "transformer_blocks.0.norm1.emb"
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[f"{emb}.timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[f"{emb}.timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[f"{emb}.timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[f"{emb}.timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[f"{emb}.class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"],
        "pos_embed": torch.zeros(1, (model.config.sample_size // model.config.patch_size) ** 2,
                                 model.config.num_attention_heads * model.config.attention_head_dim),
    }
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[f"{b}.attn1.to_{n}.weight"] for n in "qkv"])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([sd[f"{b}.attn1.to_{n}.bias"] for n in "qkv"])
        out[f"blocks.{i}.attn.proj.weight"] = sd[f"{b}.attn1.to_out.0.weight"]
        out[f"blocks.{i}.attn.proj.bias"] = sd[f"{b}.attn1.to_out.0.bias"]
        out[f"blocks.{i}.mlp.fc1.weight"] = sd[f"{b}.ff.net.0.proj.weight"]
        out[f"blocks.{i}.mlp.fc1.bias"] = sd[f"{b}.ff.net.0.proj.bias"]
        out[f"blocks.{i}.mlp.fc2.weight"] = sd[f"{b}.ff.net.2.weight"]
        out[f"blocks.{i}.mlp.fc2.bias"] = sd[f"{b}.ff.net.2.bias"]
        out[f"blocks.{i}.adaLN_modulation.1.weight"] = sd[f"{b}.norm1.linear.weight"]
        out[f"blocks.{i}.adaLN_modulation.1.bias"] = sd[f"{b}.norm1.linear.bias"]
    return out


def _shared_embedder_dit(seed: int = 0, **overrides):
    """A tiny diffusers DiT whose blocks share one embedder, as every model converted from the original does."""
    model = make_tiny_dit(seed, **overrides)
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def test_original_dit_pt_is_mapped_and_sized_from_tensors(tmp_path):
    model = _shared_embedder_dit(num_attention_heads=1, attention_head_dim=64)
    path = tmp_path / "DiT-tiny.pt"
    torch.save({"ema": _original_state_dict(model)}, path)
    loaded = load_checkpoint(path, num_heads=1)
    config = loaded.model_config
    assert (config["num_layers"], config["patch_size"], config["sample_size"]) == (2, 2, 8)
    assert (config["in_channels"], config["out_channels"], config["num_embeds_ada_norm"]) == (4, 8, 10)
    assert _same_function(loaded.model, model, config) == 0.0


# ---------------------------------------------------------------------------------------------
# The number of attention heads is never guessed
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_heads_of_32(tmp_path_factory):
    """(diffusers model, .pt of its original state dict): width 128, none of the published DiT widths."""
    model = _shared_embedder_dit(num_attention_heads=4, attention_head_dim=32)
    path = tmp_path_factory.mktemp("w128") / "DiT-w128.pt"
    torch.save(_original_state_dict(model), path)
    return model, path


def test_unpublished_width_without_num_heads_is_refused(four_heads_of_32):
    _, path = four_heads_of_32
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "hidden width 128 is none of the published DiT sizes" in message and "--num-heads N" in message
    assert "\n" not in message


def test_num_heads_given_loads_the_same_function(four_heads_of_32):
    model, path = four_heads_of_32
    loaded = load_checkpoint(path, num_heads=4)
    config = loaded.model_config
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (4, 32)
    assert _same_function(loaded.model, model, config) <= 1e-6
    # what the old 64-wide-heads fallback loaded: the same tensors, another function
    two = load_checkpoint(path, num_heads=2)
    assert _same_function(two.model, model, two.model_config) > 1e-3


@pytest.mark.parametrize("num_heads, message", [
    (3, "--num-heads 3 does not divide the hidden width 128"),
    (0, "--num-heads must be a positive integer, got 0"),
    (True, "--num-heads must be a positive integer, got True"),
])
def test_bad_num_heads_is_refused(four_heads_of_32, num_heads, message):
    _, path = four_heads_of_32
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, num_heads=num_heads)


def test_num_heads_for_a_diffusers_dir_must_agree_with_its_config(tiny_dit_dir):
    assert load_checkpoint(tiny_dit_dir, num_heads=2).model_config["num_attention_heads"] == 2
    with pytest.raises(CheckpointError, match="config.json says num_attention_heads 2, --num-heads 4"):
        load_checkpoint(tiny_dit_dir, num_heads=4)


def test_cli_refuses_an_unpublished_width_before_compiling(four_heads_of_32, tmp_path, capsys):
    from ditq_compiler.cli import build_parser, main

    _, path = four_heads_of_32
    assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditq compile: error: ") and "--num-heads N" in err[0], err
    assert not (tmp_path / "out").exists()
    for command, extra in (("compile", ["-o", "out"]), ("inspect", ["--dump-dir", "dumps"])):
        assert build_parser().parse_args([command, str(path), *extra, "--num-heads", "4"]).num_heads == 4


# ---------------------------------------------------------------------------------------------
# Training checkpoints as DiT's train.py saves them: {"model", "ema", "opt", "args"}
# ---------------------------------------------------------------------------------------------

def _adamw_state() -> dict:
    """A real AdamW state (torch 2.x), after one step on a tiny model."""
    model = make_tiny_dit(seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    model(x, t, y).sample.square().mean().backward()
    optimizer.step()
    return optimizer.state_dict()


def _training_checkpoint(ema_model, **args) -> dict:
    """``{"model", "ema", "opt", "args"}`` as train.py writes it; ``model`` is another function than ``ema``."""
    ema = collections.OrderedDict(_original_state_dict(ema_model))  # ema.state_dict() is an OrderedDict
    return {"model": {name: -tensor for name, tensor in ema.items()}, "ema": ema, "opt": _adamw_state(),
            "args": argparse.Namespace(results_dir="results", data_path="/data/imagenet/train", vae="ema",
                                       epochs=1400, global_batch_size=256, global_seed=0, num_workers=4,
                                       log_every=100, ckpt_every=50_000, **args)}


def test_training_checkpoint_takes_ema_and_its_size_from_args(tmp_path):
    # DiT-S/2 at its published depth, width and heads; 4x4 latents (image_size 32) keep it small
    model = _shared_embedder_dit(num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=4)
    path = tmp_path / "0400000.pt"
    torch.save(_training_checkpoint(model, model="DiT-S/2", image_size=32, num_classes=10), path)
    loaded = load_checkpoint(path)
    config = loaded.model_config
    assert (config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]) == (6, 64, 12)
    assert (config["patch_size"], config["sample_size"], config["num_embeds_ada_norm"]) == (2, 4, 10)
    assert _same_function(loaded.model, model, config) <= 1e-6


@pytest.mark.parametrize("args, message", [
    ({"model": "DiT-XL/2"}, r"its training args say DiT-XL/2 \(depth 28, width 1152, patch 2\) but the weights "
                            r"have depth 2, width 32, patch 2; if the weights are right, pass --num-heads N"),
    ({"model": "DiT-S/4"}, r"its training args say DiT-S/4 \(depth 12, width 384, patch 4\)"),
    ({"model": "DiT-Tiny/2"}, r"its training args name the model 'DiT-Tiny/2', not a published DiT size .* "
                              r"pass --num-heads N"),
    ({"model": "DiT-B/2", "num_heads": 2}, None),  # an explicit head count wins over the args
    ({"num_classes": 1000}, r"training args say num_classes 1000 but the class embedding has 11 rows"),
    ({"image_size": 256}, r"training args say image_size 256 \(32x32 latents\) but pos_embed is for 8x8"),
])
def test_training_args_that_do_not_describe_the_weights_are_refused(args, message, tmp_path):
    model = _shared_embedder_dit()  # depth 2, width 32 (2 heads of 16), patch 2, 8x8 latents, 10 classes
    num_heads = args.pop("num_heads", None)
    if "model" not in args:
        num_heads = 2  # the width says nothing; the cross-checks are what is tested
    path = tmp_path / "ckpt.pt"
    torch.save(_training_checkpoint(model, **args), path)
    if message is None:
        loaded = load_checkpoint(path, num_heads=num_heads)
        assert _same_function(loaded.model, model, loaded.model_config) <= 1e-6
        return
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path, num_heads=num_heads)
    assert "\n" not in str(error.value)


def test_training_args_depth_must_match_too(tmp_path):
    """The published DiT-S/2 is 12 blocks deep: 1 block means the name does not describe the weights, so its
    head count would be a guess. The published width alone (no args) still gives the heads."""
    model = _shared_embedder_dit(num_attention_heads=6, attention_head_dim=64, num_layers=1, sample_size=4)
    path = tmp_path / "ckpt.pt"
    torch.save(_training_checkpoint(model, model="DiT-S/2"), path)
    with pytest.raises(CheckpointError, match="but the weights have depth 1, width 384, patch 2"):
        load_checkpoint(path)
    torch.save({"ema": _original_state_dict(model)}, path)
    loaded = load_checkpoint(path)
    assert loaded.model_config["num_attention_heads"] == 6
    assert _same_function(loaded.model, model, loaded.model_config) <= 1e-6


class _Hook:
    pass


@pytest.mark.parametrize("extra, where", [
    ({"args": argparse.Namespace(model="DiT-S/2", hook=os.system)}, "posix.system"),
    ({"args": _Hook()}, "test_loading._Hook"),
    ({"opt": {"state": {}, "param_groups": [], "hook": argparse.Namespace()}}, "argparse.Namespace under 'opt'"),
    ({"args": argparse.Namespace(model="DiT-S/2"), "extra": collections.defaultdict(list)}, "collections.defaultdict"),
])
def test_training_checkpoint_with_other_objects_is_refused(extra, where, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": collections.OrderedDict(w=torch.zeros(1)), **extra}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "holds pickled Python objects besides tensors" in message and where in message, message
    assert "weights_only" not in message and "safe_globals" not in message and "\n" not in message


def test_missing_path():
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint("/nonexistent/dit")


def test_directory_that_is_no_dit(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a DiT checkpoint directory"):
        load_checkpoint(tmp_path)


def test_other_model_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="describes UNet2DModel, not a model ditq takes"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(CheckpointError, match="SD3Transformer2DModel is not supported yet"):
        load_checkpoint(tmp_path)


def test_corrupt_safetensors(tiny_dit_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dit_dir / "config.json").read_text())
    data = (tiny_dit_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_checkpoint(tmp_path)


def test_weights_that_do_not_match_the_config(tiny_dit_dir, tmp_path):
    config = json.loads((tiny_dit_dir / "config.json").read_text())
    config["num_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (tiny_dit_dir / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="weights do not match the config"):
        load_checkpoint(tmp_path)


def test_corrupt_pt(tmp_path):
    path = tmp_path / "DiT.pt"
    path.write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .* as a torch checkpoint"):
        load_checkpoint(path)


class _Namespace:
    pass


def test_pt_with_pickled_objects_is_refused_without_running_them(tmp_path):
    path = tmp_path / "DiT.pt"
    torch.save({"model": {}, "args": _Namespace()}, path)
    with pytest.raises(CheckpointError, match="holds pickled Python objects besides tensors"):
        load_checkpoint(path)


def test_pt_that_is_no_dit(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not an original DiT state dict"):
        load_checkpoint(path)


def test_unknown_scheduler_class(tiny_pipeline_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_pipeline_dir, tmp_path / "p")
    config_file = tmp_path / "p" / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = "os.system"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unknown scheduler class"):
        load_checkpoint(tmp_path / "p")


def test_a_training_checkpoint_compiles_to_the_artifact_of_its_ema_weights_in_diffusers_form(tmp_path, fast_config):
    """``{"model", "ema", "opt", "args"}`` (heads from --num-heads: its width is unpublished) compiles, and the
    artifact computes what the artifact of the same EMA weights saved as a diffusers directory computes."""
    from ditq_compiler import compile as compile_checkpoint
    from conftest import example_inputs

    model = _shared_embedder_dit(num_attention_heads=4, attention_head_dim=32)
    checkpoint = tmp_path / "0001000.pt"
    torch.save(_training_checkpoint(model, image_size=64, num_classes=10), checkpoint)
    model.save_pretrained(str(tmp_path / "diffusers"))
    from_training = compile_checkpoint(checkpoint, tmp_path / "a", dataclasses.replace(fast_config, num_heads=4))
    from_diffusers = compile_checkpoint(tmp_path / "diffusers", tmp_path / "b", fast_config)
    x, t, y = example_inputs(dict(model.config), batch=3, seed=5)
    got = from_training.denoise(x.numpy(), t.numpy(), y.numpy(), provider="cpu")
    expected = from_diffusers.denoise(x.numpy(), t.numpy(), y.numpy(), provider="cpu")
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()


def test_a_diffusers_weight_file_loads_as_its_directory_when_its_config_is_beside_it(tiny_dit_dir):
    from ditq_compiler.loading import load_checkpoint

    weights = tiny_dit_dir / "diffusion_pytorch_model.safetensors"
    from_file, from_directory = load_checkpoint(weights), load_checkpoint(tiny_dit_dir)
    assert from_file.sha256 == from_directory.sha256 and from_file.model_config == from_directory.model_config


def test_a_diffusers_weight_file_without_its_config_is_one_line_naming_config_json(tiny_dit_dir, tmp_path, capsys):
    import shutil

    from ditq_compiler.cli import main

    lone = tmp_path / "diffusion_pytorch_model.safetensors"
    shutil.copy(tiny_dit_dir / "diffusion_pytorch_model.safetensors", lone)
    assert main(["compile", str(lone), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a diffusers model's weights" in err[0] and "config.json" in err[0], err
    assert "x_embedder" not in err[0] and not (tmp_path / "out").exists()
