"""Original facebookresearch DiT checkpoints, mapped onto diffusers' ``DiTTransformer2DModel``.

Two forms are read, neither by running code from the file:

* a state dict (``torch.save(model.state_dict())``, or ``{"ema": sd}`` / ``{"model": sd}``), as the released
  DiT-XL/2 checkpoints are;
* a training checkpoint as DiT's ``train.py`` writes it, ``{"model": sd, "ema": sd, "opt": optimizer state,
  "args": argparse.Namespace}``. It is unpickled weights-only with ``argparse.Namespace`` allow-listed and
  nothing else; a Namespace anywhere but ``args`` is refused. The EMA weights are taken (``model`` when there
  is no ``ema``), and ``args`` gives the model size (``args.model``, e.g. ``"DiT-XL/2"``) and cross-checks
  (``args.num_classes``, ``args.image_size``).

The tensors give width, depth, patch, channels, classes and sample size. The number of attention heads is not
in them, and a wrong one gives a model that loads and runs but computes another function, so it is never
guessed. In this order it comes from: an explicit ``num_heads`` (``--num-heads``), which must divide the width;
the training args' ``args.model``, whose published depth, width and patch must all equal the tensors' (a
depth that differs means the name does not describe these weights, so its head count would be a guess); the
published size of that width (:data:`DIT_SIZES`); otherwise the checkpoint is refused, asking for
``--num-heads``.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from ..errors import CheckpointError

# The published DiT sizes (DiT paper, Table 1; facebookresearch/DiT models.py): name -> (depth, width, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# Heads of the published sizes by hidden width, for a state dict that does not name its size.
_HEADS_BY_WIDTH = {width: heads for _, width, heads in DIT_SIZES.values()}
_MODEL_NAME = re.compile(r"DiT-(S|B|L|XL)/(\d+)")
_LATENT_DOWNSAMPLE = 8  # DiT's VAE: latent size = image_size / 8
_NUM_HEADS_HINT = "pass --num-heads N (num_heads=N from Python), N dividing the width"


def load_original_dit(file: Path, *, num_heads: int | None = None) -> tuple[torch.nn.Module, dict, str]:
    """Model, its diffusers config and the file's sha256."""
    from ..loading import _load_state, _sha256_of
    from .dit import DIT

    state, train_args = read_original_checkpoint(file)
    diffusers_names = [k for k in state if k.startswith(("transformer_blocks.", "pos_embed."))]
    if diffusers_names and "x_embedder.proj.weight" not in state:  # a diffusers model's weights, not an original
        raise CheckpointError(f"{file} holds a diffusers model's weights (e.g. {diffusers_names[0]}), which load only "
                              "with their config.json; pass the model directory that holds its config.json and "
                              "weights (or the pipeline directory)")
    if "x_embedder.proj.weight" not in state or not any(k.startswith("blocks.") for k in state):
        raise CheckpointError(
            f"{file} is not an original DiT state dict (no x_embedder.proj.weight / blocks.N.*)"
        )
    config = infer_original_dit_config(state, num_heads=num_heads, train_args=train_args, where=str(file))
    converted = convert_original_dit_state_dict(state, config["num_layers"])
    model = DIT.build_model(config, file)
    _load_state(model, converted, str(file))
    return model, dict(model.config), _sha256_of([file])


def read_original_checkpoint(file: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict (a training checkpoint's ``ema``, else its ``model``) and the training args, if any."""
    from ..loading import _read_tensors, _torch_load, state_dict_of

    if file.suffix == ".safetensors":
        return _read_tensors(file), None
    # A zip checkpoint (torch.save since 1.6) is memory-mapped: a training checkpoint's model copy and
    # optimizer state (3x the EMA weights) are then never read into memory.
    with open(file, "rb") as handle:  # torch.save's zip format starts with a local file header
        is_zip = handle.read(4) == b"PK\x03\x04"
    data = _torch_load(file, allowed_globals=(argparse.Namespace,), mmap=is_zip)
    train_args = None
    if isinstance(data, dict):
        args = data.get("args")
        if isinstance(args, argparse.Namespace):
            train_args = vars(args)
        for key, value in data.items():
            if key != "args" and _holds_namespace(value):
                raise CheckpointError(
                    f"{file} holds pickled Python objects besides tensors (argparse.Namespace under {key!r}, "
                    "where DiT's train.py writes only 'args'); ditq loads weights only. Re-save just the state "
                    "dict where you trust the file: torch.save(ckpt['ema'], 'DiT.pt')")
    return state_dict_of(data, file), train_args


def _holds_namespace(value) -> bool:
    if isinstance(value, argparse.Namespace):
        return True
    if isinstance(value, dict):
        return any(_holds_namespace(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_namespace(v) for v in value)
    return False


def infer_original_dit_config(state: dict[str, torch.Tensor], *, num_heads: int | None = None,
                              train_args: dict | None = None, where: str = "original DiT state dict") -> dict:
    """The diffusers config of an original DiT state dict; see the module docstring for the head count."""
    train_args = train_args or {}
    try:
        patch_weight = state["x_embedder.proj.weight"]  # [hidden, in_channels, p, p]
        hidden, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1  # last row: the null class
    except KeyError as exc:
        raise CheckpointError(f"{where}: original DiT state dict lacks {exc.args[0]}") from None
    heads = _attention_heads(hidden, depth, patch, num_heads, train_args.get("model"), where)
    image_size = train_args.get("image_size")
    if "pos_embed" in state:
        grid = math.isqrt(state["pos_embed"].shape[1])
        sample_size = grid * patch
        if isinstance(image_size, int) and image_size // _LATENT_DOWNSAMPLE != sample_size:
            raise CheckpointError(
                f"{where}: its training args say image_size {image_size} ({image_size // _LATENT_DOWNSAMPLE}x"
                f"{image_size // _LATENT_DOWNSAMPLE} latents) but pos_embed is for {sample_size}x{sample_size}")
    elif isinstance(image_size, int):
        sample_size = image_size // _LATENT_DOWNSAMPLE
    else:
        sample_size = 32  # DiT-*-256: 32x32 latents
    expected_classes = train_args.get("num_classes")
    if isinstance(expected_classes, int) and expected_classes != num_classes:
        raise CheckpointError(
            f"{where}: its training args say num_classes {expected_classes} but the class embedding has "
            f"{num_classes + 1} rows ({num_classes} classes and the null class)")
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


def _attention_heads(hidden: int, depth: int, patch: int, num_heads, model_name, where: str) -> int:
    if num_heads is not None:  # a positive int: load_checkpoint checked it
        if hidden % num_heads:
            raise CheckpointError(f"{where}: --num-heads {num_heads} does not divide the hidden width {hidden}")
        return num_heads
    if model_name is not None:
        found = _MODEL_NAME.fullmatch(str(model_name))
        if not found:
            raise CheckpointError(
                f"{where}: its training args name the model {model_name!r}, not a published DiT size "
                f"(DiT-S|B|L|XL/patch), so the number of attention heads is unknown; {_NUM_HEADS_HINT} {hidden}")
        size_depth, size_width, size_heads = DIT_SIZES[found.group(1)]
        size_patch = int(found.group(2))
        if (size_depth, size_width, size_patch) != (depth, hidden, patch):
            raise CheckpointError(
                f"{where}: its training args say {model_name} (depth {size_depth}, width {size_width}, patch "
                f"{size_patch}) but the weights have depth {depth}, width {hidden}, patch {patch}; if the weights "
                f"are right, {_NUM_HEADS_HINT} {hidden}")
        return size_heads
    if hidden in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[hidden]
    raise CheckpointError(
        f"{where}: hidden width {hidden} is none of the published DiT sizes ({', '.join(map(str, _HEADS_BY_WIDTH))}) "
        f"and the checkpoint does not name its model, so the number of attention heads is unknown; "
        f"{_NUM_HEADS_HINT} {hidden}")


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
