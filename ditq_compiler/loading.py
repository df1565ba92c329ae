"""Load a checkpoint without executing code from it; the model family (``families/``) builds the model.

Accepted forms:

* a diffusers model directory: ``config.json`` + ``*.safetensors`` (or an index of shards) of a class some
  model family takes (``families.FAMILIES``);
* a diffusers pipeline directory holding ``transformer/`` and optionally ``scheduler/`` (and, for a text-to-image
  family, the text encoder and tokenizer that calibration runs; see ``recording.py``);
* an original facebookresearch DiT state dict or training checkpoint (``.pt``/``.pth``, DiT-XL/2 naming),
  mapped onto the diffusers model the way diffusers' ``scripts/convert_dit_to_diffusers.py`` maps it, with
  the model size from the tensors and the number of heads never guessed (``families/dit_original.py``).

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``; nothing is unpickled
beyond tensors and plain containers (and, in a DiT training checkpoint, its ``argparse.Namespace`` args).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

from .families import FAMILIES, ModelFamily
from .families.dit import DIT_DEFAULT_SCHEDULER_CONFIG as DEFAULT_SCHEDULER_CONFIG  # noqa: F401  (bench, tests)

# Classes we recognise and will support later: a clear message instead of a confusing failure.
KNOWN_UNSUPPORTED_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    model_class: str
    model_config: dict
    scheduler_config: dict
    source: str
    sha256: str
    # the diffusers pipeline directory the transformer came from (its text encoder calibrates a text family)
    pipeline_dir: str | None = None

    @property
    def family(self) -> ModelFamily:
        return FAMILIES[self.model_class]


def load_checkpoint(path: str | Path, *, num_heads: int | None = None) -> LoadedCheckpoint:
    """Load a checkpoint. ``num_heads`` (``--num-heads``) gives the number of attention heads where the
    checkpoint does not: an original DiT state dict of no published width. A diffusers config's
    ``num_attention_heads`` must agree with it."""
    path = Path(path)
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise CheckpointError(f"--num-heads must be a positive integer, got {num_heads!r}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        pipeline_dir = None
        if (path / "config.json").is_file():
            model_dir, scheduler_dir = path, None
        elif (path / "transformer").is_dir():
            model_dir, pipeline_dir = path / "transformer", path
            scheduler_dir = path / "scheduler" if (path / "scheduler").is_dir() else None
        else:
            raise CheckpointError(
                f"{path} is not a DiT checkpoint directory: expected config.json (diffusers model) "
                "or a transformer/ subdirectory (diffusers pipeline)"
            )
        family, model, config, digest = _load_diffusers_dir(model_dir, num_heads)
        scheduler_config = _load_scheduler_config(scheduler_dir) if scheduler_dir else \
            dict(family.default_scheduler_config)
    elif _is_the_weights_of_its_directory(path):
        # a diffusers model's weight file, with its config beside it: the model directory is meant
        return load_checkpoint(path.parent, num_heads=num_heads)
    elif path.suffix in (".pt", ".pth", ".ckpt", ".safetensors"):
        pipeline_dir = None
        family = next(f for f in FAMILIES.values() if f.loads_original_checkpoints)
        model, config, digest = family.load_original(path, num_heads=num_heads)
        scheduler_config = dict(family.default_scheduler_config)
    else:
        raise CheckpointError(
            f"unsupported checkpoint {path}: give a diffusers directory or an original DiT .pt state dict"
        )
    model.eval().float()
    return LoadedCheckpoint(model, type(model).__name__, config, scheduler_config, str(path), digest,
                            str(pipeline_dir) if pipeline_dir else None)


def _is_the_weights_of_its_directory(path: Path) -> bool:
    """``path`` is a ``.safetensors`` file beside a ``config.json`` of a model ditq takes, and loading that
    directory reads exactly its weights (the only weight file there, or a shard of its index): then the user
    meant the directory. Anything else (another config, a variant beside it) is not guessed."""
    if path.suffix != ".safetensors" or not (path.parent / "config.json").is_file():
        return False
    try:
        config = json.loads((path.parent / "config.json").read_text())
        files = _weight_files(path.parent)
    except (OSError, ValueError, CheckpointError):
        return False
    if not isinstance(config, dict) or config.get("_class_name") not in FAMILIES:
        return False
    indexed = any(path.parent.glob("*.safetensors.index.json"))
    return path.resolve() in {f.resolve() for f in files} and (indexed or len(files) == 1)


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


def _load_diffusers_dir(model_dir: Path, num_heads: int | None = None) -> tuple[ModelFamily, torch.nn.Module, dict,
                                                                                 str]:
    config = _read_json(model_dir / "config.json")
    class_name = config.get("_class_name")
    supported = ", ".join(FAMILIES)
    if class_name in KNOWN_UNSUPPORTED_CLASSES:
        raise CheckpointError(f"{model_dir}: {class_name} is not supported yet (supported: {supported})")
    family = FAMILIES.get(class_name)
    if family is None:
        raise CheckpointError(
            f"{model_dir}/config.json describes {class_name or 'no _class_name'}, not a model ditq takes "
            f"({supported})"
        )
    model = family.build_model(config, model_dir)
    if num_heads is not None and num_heads != model.config.num_attention_heads:
        raise CheckpointError(
            f"{model_dir}/config.json says num_attention_heads {model.config.num_attention_heads}, --num-heads "
            f"{num_heads}: drop --num-heads (a diffusers config gives the heads) or fix the config")
    weight_files = _weight_files(model_dir)
    state_dict: dict[str, torch.Tensor] = {}
    for file in weight_files:
        state_dict.update(_read_tensors(file))
    _load_state(model, state_dict, str(model_dir))
    return family, model, dict(model.config), _sha256_of([model_dir / "config.json", *weight_files])


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


def _torch_load(file: Path, allowed_globals: tuple = (), mmap: bool = False):
    """``torch.load(weights_only=True)``: tensors, plain containers and ``allowed_globals`` only."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise beside our one line
            warnings.simplefilter("ignore", UserWarning)
            with torch.serialization.safe_globals(list(allowed_globals)):
                return torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise CheckpointError(_torch_load_failure(file, exc)) from None


def _torch_load_weights(file: Path) -> dict[str, torch.Tensor]:
    return state_dict_of(_torch_load(file), file)


def state_dict_of(data, file: Path) -> dict[str, torch.Tensor]:
    """The state dict a loaded ``.pt`` holds: itself, or the one nested under ``ema``, ``model`` or ``state_dict``
    (in that order); anything else is refused with one line."""
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
