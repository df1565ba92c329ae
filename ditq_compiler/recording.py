"""Calibration through the user's diffusers pipeline: record the transformer's calls, replay them in calibration.

A text-to-image family (PixArt) is calibrated the way users run it and the way ModelOpt and deepcompressor
calibrate it: ditq loads the user's diffusers pipeline (text encoder, tokenizer, scheduler, transformer; no VAE:
calibration stops at the latents), runs it on the calibration prompts with classifier-free guidance against the
empty prompt, and a forward pre-hook on ``pipe.transformer`` records every call's inputs in the family's signature
order. The text encoder is then dropped, and calibration replays the recorded calls through the traced graph
(``passes/calibrate.py``).

``ditq record PIPELINE_DIR -o FILE`` writes a recording to a safetensors file, so a transformer-only directory can
be compiled with ``--calibration-inputs FILE``. Layout (one file, written atomically):

* ``rows.NAME``: the distinct rows of a prompt-dependent input (text embeddings, their mask), stored once, and
  ``call.NNNNN.NAME.index`` the row of each batch entry of call ``NNNNN``: a prompt's T5 embedding is the same at
  every step, so 25 steps cost one copy, not 25;
* ``call.NNNNN.NAME``: the other inputs (latents, timesteps) of each call;
* metadata ``ditq.format`` (:data:`FORMAT`), ``ditq.signature`` (the input names, in order) and ``ditq.source``
  (JSON: the pipeline and text encoder classes, prompts, steps, guidance, seed).

A loaded recording is checked against the model before any work: input names, widths (latent channels and size,
text width), one timestep per call inside the scheduler's range, and text embeddings that look like a text
encoder's: real T5 outputs have a few channels far larger than the rest, random ones (``torch.randn``: channel
max / median 1.2-1.5, measured at 32 to 4096 channels) do not, and calibrating cross-attention on them would give
ranges that real prompts exceed.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .families import ModelFamily, Signature

FORMAT = "ditq-recorded-calls/1"
# inputs that depend on the prompt only: stored once per distinct row
PROMPT_ROLES = ("text", "mask", "pooled")
# channel max / median of |text embedding| below which embeddings are taken for random ones (randn: 1.2-1.5)
MIN_TEXT_OUTLIER_RATIO = 3.0


@dataclass
class Recording:
    """Recorded transformer calls: ``len(recording)`` calls, iterated as ``(timestep, inputs in signature order)``."""

    signature: Signature
    rows: dict[str, torch.Tensor]  # prompt-dependent input -> its distinct rows
    calls: list[dict[str, torch.Tensor]]  # per call: NAME (a per-call input) or NAME.index (rows of ``rows``)
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.calls)

    def inputs(self, index: int) -> tuple[torch.Tensor, ...]:
        call = self.calls[index]
        return tuple(self.rows[spec.name][call[f"{spec.name}.index"]] if spec.name in self.rows else call[spec.name]
                     for spec in self.signature.inputs)

    def shapes(self, index: int) -> list[tuple[int, ...]]:
        """Each input's shape in call ``index`` (signature order), read from the stored tensors without building
        the call (a ``KeyError``/``IndexError`` where the call is incomplete or indexes past its rows)."""
        call, shapes = self.calls[index], []
        for spec in self.signature.inputs:
            if spec.name in self.rows:
                rows, indices = self.rows[spec.name], call[f"{spec.name}.index"]
                if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < rows.shape[0]:
                    raise IndexError(f"{spec.name}.index")
                shapes.append((indices.shape[0], *rows.shape[1:]))
            else:
                shapes.append(tuple(call[spec.name].shape))
        return shapes

    def timestep(self, index: int) -> int:
        return int(self.calls[index][self.signature.timestep_name][0])

    def __iter__(self):
        for index in range(len(self.calls)):
            yield self.timestep(index), self.inputs(index)

    def check_inputs(self) -> tuple[torch.Tensor, ...]:
        """Two rows of the first call (an unconditional and a conditional one): the graph is traced on them."""
        inputs = self.inputs(0)
        rows = sorted({0, inputs[0].shape[0] - 1})
        return tuple(value[rows].clone() for value in inputs)

    # -- writing -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the recording to ``path`` atomically (a temporary file renamed over it)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"rows.{name}": rows.contiguous() for name, rows in self.rows.items()}
        for index, call in enumerate(self.calls):
            tensors.update({f"call.{index:05d}.{key}": value.contiguous() for key, value in call.items()})
        metadata = {"ditq.format": FORMAT, "ditq.signature": json.dumps(list(self.signature.names)),
                    "ditq.source": json.dumps(self.source, sort_keys=True)}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            save_file(tensors, str(partial), metadata=metadata)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return path


class _Recorder:
    """Collects calls, storing each distinct prompt-dependent row once (by content hash)."""

    def __init__(self, signature: Signature):
        self.signature = signature
        self.prompt_inputs = [spec.name for spec in signature.inputs if spec.role in PROMPT_ROLES]
        self.row_index: dict[str, dict[str, int]] = {name: {} for name in self.prompt_inputs}
        self.row_values: dict[str, list[torch.Tensor]] = {name: [] for name in self.prompt_inputs}
        self.calls: list[dict[str, torch.Tensor]] = []

    def add(self, values: tuple[torch.Tensor, ...]) -> None:
        call: dict[str, torch.Tensor] = {}
        for spec, value in zip(self.signature.inputs, values):
            value = value.detach().to("cpu", getattr(torch, spec.dtype)).contiguous()
            if spec.name not in self.row_index:
                call[spec.name] = value.clone()
                continue
            indices = []
            for row in value:
                digest = hashlib.sha256(row.numpy().tobytes()).hexdigest()
                if digest not in self.row_index[spec.name]:
                    self.row_index[spec.name][digest] = len(self.row_values[spec.name])
                    self.row_values[spec.name].append(row.clone())
                indices.append(self.row_index[spec.name][digest])
            call[f"{spec.name}.index"] = torch.tensor(indices, dtype=torch.int64)
        timestep = call[self.signature.timestep_name]
        if bool((timestep != timestep[0]).any()):
            raise CheckpointError("the pipeline called the transformer with several timesteps in one batch; "
                                  "ditq records one timestep per call")
        self.calls.append(call)

    def recording(self, source: dict) -> Recording:
        rows = {name: torch.stack(values) for name, values in self.row_values.items()}
        return Recording(self.signature, rows, self.calls, source)


@contextmanager
def quiet_loading():
    """diffusers' and transformers' loading progress bars off (ditq shows its own phases)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def pipeline_has_text_encoder(pipeline_dir: Path) -> bool:
    """Whether a diffusers pipeline directory lists a text encoder and holds it."""
    index = pipeline_dir / "model_index.json"
    if not index.is_file():
        return False
    try:
        entry = json.loads(index.read_text()).get("text_encoder")
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(entry, list) and entry[0] is not None and (pipeline_dir / "text_encoder").is_dir()


def load_user_pipeline(pipeline_dir: Path, **components):
    """The diffusers pipeline at ``pipeline_dir``, with ``components`` in place of its own. A component its
    ``model_index.json`` lists as absent (``[null, null]``, as ``save_pretrained`` writes a ``None`` VAE) is passed
    as None, which diffusers does not do by itself. A directory diffusers cannot load is one line."""
    from diffusers import DiffusionPipeline

    try:
        index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {Path(pipeline_dir) / 'model_index.json'}: {exc}") from None
    absent = {name: None for name, entry in index.items()
              if isinstance(entry, list) and len(entry) == 2 and entry[0] is None}
    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), use_safetensors=True,
                                                     **{**absent, **components})
    except Exception as exc:  # diffusers raises many types for a broken directory
        raise CheckpointError(f"cannot load the diffusers pipeline at {pipeline_dir}: {exc}".splitlines()[0]) \
            from None
    pipe.set_progress_bar_config(disable=True)
    vae_config = Path(pipeline_dir) / "vae" / "config.json"
    if getattr(pipe, "vae", None) is None and vae_config.is_file() and hasattr(pipe, "vae_scale_factor"):
        # Without its VAE a pipeline takes the scale factor for 8 and derives the image size it passes on (PixArt-α
        # 1024's resolution input) from it: give it the VAE's own, from the config alone.
        try:
            levels = len(json.loads(vae_config.read_text())["block_out_channels"])
        except (OSError, ValueError, KeyError, TypeError):
            levels = None
        if levels:
            pipe.vae_scale_factor = 2 ** (levels - 1)
    return pipe


def record_pipeline(pipeline_dir: str | Path, family: ModelFamily, model_config: dict, *, prompts: list[str],
                    steps: int, guidance_scale: float, seed: int, batch_size: int,
                    transformer: torch.nn.Module | None = None) -> Recording:
    """Run the diffusers pipeline at ``pipeline_dir`` on ``prompts`` (``batch_size`` at a time, against the empty
    prompt) and record every transformer call. ``transformer``: the already loaded model (else the pipeline's own).
    The pipeline, with its text encoder, is released before returning."""

    from .progress import track

    pipeline_dir = Path(pipeline_dir)  # its text encoder was checked before the transformer was loaded
    pipe = load_user_pipeline(pipeline_dir, vae=None, **({"transformer": transformer} if transformer is not None
                                                        else {}))
    signature = family.signature(model_config)
    recorder = _Recorder(signature)
    parameters = inspect.signature(pipe.transformer.forward)

    def hook(module, args, kwargs):
        bound = parameters.bind_partial(*args, **kwargs).arguments
        values = tuple(spec.value_in(bound) for spec in signature.inputs)
        missing = [spec.kwarg for spec, value in zip(signature.inputs, values) if value is None]
        if missing:
            raise ConfigError(f"the pipeline at {pipeline_dir} did not pass {', '.join(missing)} to its transformer, "
                              "which the model takes")
        recorder.add(values)

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    batches = [prompts[start:start + batch_size] for start in range(0, len(prompts), batch_size)]
    try:
        with torch.no_grad():
            for number, batch in enumerate(track(batches, total=len(batches), description="recording the pipeline")):
                generator = torch.Generator().manual_seed(seed + number)
                pipe(prompt=batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                     **family.pipeline_call_kwargs(model_config))
    finally:
        handle.remove()
    source = {"producer": "ditq", "pipeline": type(pipe).__name__,
              "text_encoder": type(getattr(pipe, "text_encoder", None)).__name__, "prompts": len(prompts),
              "steps": steps, "guidance_scale": guidance_scale, "seed": seed, "calls": len(recorder.calls)}
    del pipe, hook
    gc.collect()  # the text encoder goes now: calibration holds only the recording
    return recorder.recording(source)


def missing_encoder_message(path: Path) -> str:
    return (f"{path} has no text encoder to calibrate with: give the full diffusers pipeline directory, or record "
            f"the transformer's inputs once with `ditq record PIPELINE_DIR -o calls.safetensors` and compile with "
            f"--calibration-inputs calls.safetensors")


def load_recording(path: str | Path, family: ModelFamily, model_config: dict, scheduler_config: dict) -> Recording:
    """Read a recording written by :meth:`Recording.save` and check it against the model (see the module doc);
    anything wrong is one line (a ``ConfigError``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--calibration-inputs: {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--calibration-inputs: {path} is not a safetensors file ({exc})") from None
    if metadata.get("ditq.format") != FORMAT:
        raise ConfigError(f"--calibration-inputs: {path} is not a recording of transformer calls ({FORMAT}); "
                          "write one with `ditq record PIPELINE_DIR -o FILE`")
    signature = family.signature(model_config)
    names = json.loads(metadata.get("ditq.signature", "[]"))
    if names != list(signature.names):
        raise ConfigError(f"--calibration-inputs: {path} records inputs {names}, the model takes "
                          f"{list(signature.names)}")
    rows = {key[len("rows."):]: value for key, value in tensors.items() if key.startswith("rows.")}
    count = len({key.split(".")[1] for key in tensors if key.startswith("call.")})
    calls = [{key[len(f"call.{index:05d}."):]: value for key, value in tensors.items()
              if key.startswith(f"call.{index:05d}.")} for index in range(count)]
    recording = Recording(signature, rows, calls, json.loads(metadata.get("ditq.source", "{}")))
    check_recording(recording, family, model_config, scheduler_config, where=f"--calibration-inputs {path}")
    return recording


def check_recording(recording: Recording, family: ModelFamily, model_config: dict, scheduler_config: dict, *,
                    where: str) -> None:
    """Widths, timesteps and text embeddings of a recording, against the model; one line (``ConfigError``) each."""
    if not recording.calls:
        raise ConfigError(f"{where}: the recording holds no transformer call")
    expected = family.fixed_dims(model_config)
    domain = family.timestep_domain(scheduler_config)
    named: dict[str, int] = {}
    for index in range(len(recording)):
        try:
            shapes = recording.shapes(index)  # without building the call's tensors
        except (KeyError, IndexError) as exc:
            raise ConfigError(f"{where}: call {index} is incomplete or points past its rows ({exc})") from None
        batch = shapes[0][0]
        for spec, shape in zip(recording.signature.inputs, shapes):
            if len(shape) != len(spec.shape):
                raise ConfigError(f"{where}: {spec.name} has {len(shape)} dims, the model takes {len(spec.shape)}")
            for dim, size in zip(spec.shape, shape):
                want = batch if dim == "batch" else expected.get(dim, dim) if isinstance(dim, str) else dim
                if isinstance(want, str):  # a named size the model leaves open (text tokens): one value throughout
                    want = named.setdefault(want, int(size))
                if int(size) != int(want):
                    raise ConfigError(f"{where}: {spec.name} has {dim} {int(size)}, the model takes {want} "
                                      f"(recorded with another model?)")
        try:
            domain.check(recording.calls[index][recording.signature.timestep_name])
        except Exception as exc:
            raise ConfigError(f"{where}: {exc}") from None
    for spec in recording.signature.inputs:
        if spec.role == "text":
            ratio = text_outlier_ratio(recording, spec.name)
            if ratio < MIN_TEXT_OUTLIER_RATIO:
                raise ConfigError(
                    f"{where}: the text embeddings look random (channel max/median {ratio:.1f}, under "
                    f"{MIN_TEXT_OUTLIER_RATIO:g}: a text encoder's have a few channels far larger than the rest); "
                    "record real ones with `ditq record PIPELINE_DIR -o FILE`")


def text_outlier_ratio(recording: Recording, name: str) -> float:
    """max over channels / median over channels of each channel's largest |value| over the real (unpadded) tokens."""
    rows = recording.rows.get(name)
    if rows is None:  # not deduplicated: every call's rows
        tokens = torch.cat([call[name].reshape(-1, call[name].shape[-1]) for call in recording.calls])
    else:
        mask_name = next((spec.name for spec in recording.signature.inputs if spec.role == "mask"), None)
        mask_of: dict[int, int | None] = {}  # text row -> the mask row it was called with
        for call in recording.calls:
            masks = call.get(f"{mask_name}.index") if mask_name else None
            for position, row in enumerate(call[f"{name}.index"].tolist()):
                mask_of.setdefault(row, int(masks[position]) if masks is not None else None)
        parts = []
        for row, mask_row in mask_of.items():
            value = rows[row].reshape(-1, rows.shape[-1])
            if mask_row is not None:
                keep = recording.rows[mask_name][mask_row].reshape(-1).bool()
                value = value[keep] if bool(keep.any()) else value
            parts.append(value)
        tokens = torch.cat(parts)
    tokens = tokens.to(torch.float32)
    channel = tokens.abs().amax(dim=0)
    return float(channel.max() / channel.median().clamp_min(1e-12))
