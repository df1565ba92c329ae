"""Load a DiT checkpoint without executing code from it.

Accepted forms:

* a diffusers model directory: ``config.json`` + ``*.safetensors`` (or an index of shards) of a
  ``DiTTransformer2DModel``;
* a diffusers pipeline directory holding ``transformer/`` and optionally ``scheduler/``;
* an original facebookresearch DiT state dict (``.pt``/``.pth``, DiT-XL/2 naming), mapped onto the
  diffusers model the way diffusers' ``scripts/convert_dit_to_diffusers.py`` maps it, with the model
  size inferred from the tensors.

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``; nothing is unpickled
beyond tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

SUPPORTED_MODEL_CLASSES = ("DiTTransformer2DModel",)
# Classes we recognise and will support later: a clear message instead of a confusing failure.
KNOWN_UNSUPPORTED_CLASSES = ("PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")

# DiT's own default (the paper's training setup): DDPM, 1000 steps, linear betas.
DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}

# Heads of the published DiT sizes, by hidden width (DiT-S/B/L/XL); others fall back to 64-wide heads.
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    model_class: str
    model_config: dict
    scheduler_config: dict
    source: str
    sha256: str


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / "config.json").is_file():
            model_dir, scheduler_dir = path, None
        elif (path / "transformer").is_dir():
            model_dir = path / "transformer"
            scheduler_dir = path / "scheduler" if (path / "scheduler").is_dir() else None
        else:
            raise CheckpointError(
                f"{path} is not a DiT checkpoint directory: expected config.json (diffusers model) "
                "or a transformer/ subdirectory (diffusers pipeline)"
            )
        model, config, digest = _load_diffusers_dir(model_dir)
        scheduler_config = _load_scheduler_config(scheduler_dir) if scheduler_dir else dict(DEFAULT_SCHEDULER_CONFIG)
    elif path.suffix in (".pt", ".pth", ".ckpt", ".safetensors"):
        model, config, digest = _load_original_dit(path)
        scheduler_config = dict(DEFAULT_SCHEDULER_CONFIG)
    else:
        raise CheckpointError(
            f"unsupported checkpoint {path}: give a diffusers directory or an original DiT .pt state dict"
        )
    model.eval().float()
    return LoadedCheckpoint(model, "DiTTransformer2DModel", config, scheduler_config, str(path), digest)


def _sha256_of(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return data


def _load_diffusers_dir(model_dir: Path) -> tuple[torch.nn.Module, dict, str]:
    config = _read_json(model_dir / "config.json")
    class_name = config.get("_class_name")
    if class_name in KNOWN_UNSUPPORTED_CLASSES:
        raise CheckpointError(f"{model_dir}: {class_name} is not supported yet (supported: DiTTransformer2DModel)")
    if class_name not in SUPPORTED_MODEL_CLASSES:
        raise CheckpointError(
            f"{model_dir}/config.json describes {class_name or 'no _class_name'}, not a DiTTransformer2DModel"
        )
    weight_files = _weight_files(model_dir)
    state_dict: dict[str, torch.Tensor] = {}
    for file in weight_files:
        state_dict.update(_read_tensors(file))
    model = _build_dit(config, model_dir)
    _load_state(model, state_dict, str(model_dir))
    return model, dict(model.config), _sha256_of([model_dir / "config.json", *weight_files])


def _weight_files(model_dir: Path) -> list[Path]:
    index = sorted(model_dir.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(_read_json(index[0]).get("weight_map", {}).values()))
        files = [model_dir / shard for shard in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shards listed in {index[0].name} are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{model_dir} has a config.json but no *.safetensors weights")
    return files


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"corrupt safetensors file {file}: {exc}") from None
    return _torch_load_weights(file)


def _torch_load_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise beside our one line
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise CheckpointError(_torch_load_failure(file, exc)) from None
    if isinstance(data, dict):
        for key in ("ema", "model", "state_dict"):  # DiT training checkpoints nest the weights
            if key in data and isinstance(data[key], dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return data


def _torch_load_failure(file: Path, exc: Exception) -> str:
    """One line for a .pt that torch's weights-only loader refused.

    torch's own text advises re-running with ``weights_only=False`` (which runs whatever code the pickle
    holds) or allowlisting globals; ditq never repeats that advice, so the line is built from the facts:
    which global the pickle wanted, or which part of it is unreadable.
    """
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"{file} holds pickled Python objects besides tensors ({found.group(1)}); ditq loads weights only "
                "and never runs code from a checkpoint. Re-save just the state dict where you trust the file: "
                "torch.save(ckpt['ema'], 'DiT.pt')")
    if "Weights only load failed" in text:
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        detail = reason.group(1).strip()[:200] if reason else "unreadable pickle"
        return f"cannot read {file} as a torch checkpoint ({detail}): it is corrupt or was not written by torch.save"
    lines = [line for line in text.strip().splitlines() if "weights_only" not in line]
    detail = lines[0][:200] if lines else type(exc).__name__
    return f"cannot read {file} as a torch checkpoint: {detail}"


def _build_dit(config: dict, where) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    try:
        return DiTTransformer2DModel.from_config(config)
    except Exception as exc:
        raise CheckpointError(f"{where}: invalid DiTTransformer2DModel config: {exc}") from None


def _load_state(model: torch.nn.Module, state_dict: dict, where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the config ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[key].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: {key} contains NaN or inf")
    model.load_state_dict(state_dict, strict=True)


def _load_scheduler_config(scheduler_dir: Path) -> dict:
    file = scheduler_dir / "scheduler_config.json"
    if not file.is_file():
        raise CheckpointError(f"{scheduler_dir} has no scheduler_config.json")
    config = _read_json(file)
    from .sampling import make_scheduler

    make_scheduler(config)  # validates the class name and its arguments now, not at run time
    return config


# ---------------------------------------------------------------------------------------------
# Original facebookresearch DiT checkpoints
# ---------------------------------------------------------------------------------------------

def _load_original_dit(file: Path) -> tuple[torch.nn.Module, dict, str]:
    state = _read_tensors(file)
    if "x_embedder.proj.weight" not in state or not any(k.startswith("blocks.") for k in state):
        raise CheckpointError(
            f"{file} is not an original DiT state dict (no x_embedder.proj.weight / blocks.N.*)"
        )
    config = infer_original_dit_config(state)
    converted = convert_original_dit_state_dict(state, config["num_layers"])
    model = _build_dit(config, file)
    _load_state(model, converted, str(file))
    return model, dict(model.config), _sha256_of([file])


def infer_original_dit_config(state: dict[str, torch.Tensor]) -> dict:
    patch_weight = state["x_embedder.proj.weight"]  # [hidden, in_channels, p, p]
    hidden, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    heads = _HEADS_BY_WIDTH.get(hidden, hidden // 64 if hidden % 64 == 0 else 0)
    if not heads:
        raise CheckpointError(f"cannot infer the number of attention heads for hidden width {hidden}")
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1  # last row: the null class
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1]
        grid = math.isqrt(tokens)
        sample_size = grid * patch
    else:
        sample_size = 32  # DiT-*-256: 32x32 latents
    return {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": depth,
        "sample_size": sample_size,
        "patch_size": patch,
        "num_embeds_ada_norm": num_classes,
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # the original DiT's LayerNorm eps
        "attention_bias": True,
    }


def convert_original_dit_state_dict(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Map facebookresearch DiT names onto diffusers' ``DiTTransformer2DModel`` names.

    The shared timestep/label embedder is copied into every block (diffusers keeps one per block), the
    fused qkv projection is split in three, and the final layer becomes ``proj_out_1``/``proj_out_2``.
    """
    try:
        out = {
            "pos_embed.proj.weight": state["x_embedder.proj.weight"],
            "pos_embed.proj.bias": state["x_embedder.proj.bias"],
            "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
            "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
            "proj_out_2.weight": state["final_layer.linear.weight"],
            "proj_out_2.bias": state["final_layer.linear.bias"],
        }
        for i in range(depth):
            block, src = f"transformer_blocks.{i}", f"blocks.{i}"
            emb = f"{block}.norm1.emb"
            out[f"{emb}.timestep_embedder.linear_1.weight"] = state["t_embedder.mlp.0.weight"]
            out[f"{emb}.timestep_embedder.linear_1.bias"] = state["t_embedder.mlp.0.bias"]
            out[f"{emb}.timestep_embedder.linear_2.weight"] = state["t_embedder.mlp.2.weight"]
            out[f"{emb}.timestep_embedder.linear_2.bias"] = state["t_embedder.mlp.2.bias"]
            out[f"{emb}.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
            out[f"{block}.norm1.linear.weight"] = state[f"{src}.adaLN_modulation.1.weight"]
            out[f"{block}.norm1.linear.bias"] = state[f"{src}.adaLN_modulation.1.bias"]
            q, k, v = torch.chunk(state[f"{src}.attn.qkv.weight"], 3, dim=0)
            qb, kb, vb = torch.chunk(state[f"{src}.attn.qkv.bias"], 3, dim=0)
            for name, w, b in (("to_q", q, qb), ("to_k", k, kb), ("to_v", v, vb)):
                out[f"{block}.attn1.{name}.weight"] = w.contiguous()
                out[f"{block}.attn1.{name}.bias"] = b.contiguous()
            out[f"{block}.attn1.to_out.0.weight"] = state[f"{src}.attn.proj.weight"]
            out[f"{block}.attn1.to_out.0.bias"] = state[f"{src}.attn.proj.bias"]
            out[f"{block}.ff.net.0.proj.weight"] = state[f"{src}.mlp.fc1.weight"]
            out[f"{block}.ff.net.0.proj.bias"] = state[f"{src}.mlp.fc1.bias"]
            out[f"{block}.ff.net.2.weight"] = state[f"{src}.mlp.fc2.weight"]
            out[f"{block}.ff.net.2.bias"] = state[f"{src}.mlp.fc2.bias"]
    except KeyError as exc:
        raise CheckpointError(f"original DiT state dict lacks {exc.args[0]}") from None
    return out
