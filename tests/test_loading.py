import json

import pytest
import torch

from conftest import make_tiny_dit
from ditq_compiler.errors import CheckpointError, ConfigError
from ditq_compiler.loading import DEFAULT_SCHEDULER_CONFIG, load_checkpoint


def _same_function(a, b, config) -> float:
    from ditq_compiler.tracing import example_inputs

    x, t, y = example_inputs(config, batch=3)
    with torch.no_grad():
        return float((a(x, t, y).sample - b(x, t, y).sample).abs().max())


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


def test_original_dit_pt_is_mapped_and_sized_from_tensors(tmp_path):
    model = make_tiny_dit(num_attention_heads=1, attention_head_dim=64)
    with torch.no_grad():  # the original DiT shares one embedder between blocks
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    path = tmp_path / "DiT-tiny.pt"
    torch.save({"ema": _original_state_dict(model)}, path)
    loaded = load_checkpoint(path)
    config = loaded.model_config
    assert (config["num_layers"], config["patch_size"], config["sample_size"]) == (2, 2, 8)
    assert (config["in_channels"], config["out_channels"], config["num_embeds_ada_norm"]) == (4, 8, 10)
    assert _same_function(loaded.model, model, config) == 0.0


def test_missing_path():
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint("/nonexistent/dit")


def test_directory_that_is_no_dit(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a DiT checkpoint directory"):
        load_checkpoint(tmp_path)


def test_other_model_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="describes UNet2DModel, not a DiTTransformer2DModel"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="PixArtTransformer2DModel is not supported yet"):
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
