"""What makes an artifact trustworthy: the sha256 of every file, a sealed manifest, and a parser that
turns any manifest.json into either a checked dict or one clear :class:`ArtifactError`.

* Every file of the model (``model.onnx``, ``model.onnx.data``) is listed in ``manifest["integrity"]``
  with its size and sha256. Loading compares sizes first (a truncated or appended file is caught
  without reading it) and then hashes in 1 MiB blocks, so a multi-gigabyte model is never held in
  memory twice.
* The manifest carries ``manifest_sha256``: the sha256 of its own canonical JSON (sorted keys, no
  whitespace) without that key. An edited manifest, a changed scheduler or a changed file hash, is
  caught. It is a checksum against corruption and accidental edits, not a signature: whoever edits the
  manifest on purpose can recompute it.
* Files whose content legitimately differs between two identical compiles (``compile_log.json``: wall
  clock times) are listed in ``unhashed_files`` and are never read by loading, so the hashed files are
  byte-identical for the same checkpoint, options and seed.

The parser validates exactly what ditq reads back (the model config's sizes, the scheduler, the file
lists), so a manifest that passes it cannot make a later stage fail with a ``KeyError``/``TypeError``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .errors import ArtifactError

FORMAT_VERSION = 2
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
COMPILE_LOG_FILE = "compile_log.json"
SEAL_KEY = "manifest_sha256"
HASH_BLOCK = 1 << 20
GROUP_MODEL_FILE = re.compile(r"model\.group\d{1,4}\.onnx(\.data)?")  # one model per timestep group (TensorRT)


def group_model_file(group: int) -> str:
    """The file of timestep group ``group``'s own model in a tensorrt-target artifact."""
    return f"model.group{group}.onnx"


class _ArtifactFileNames(frozenset):
    """The fixed names, and the per-group model files (``model.group<g>.onnx`` and its ``.data``)."""

    def __contains__(self, name) -> bool:
        return frozenset.__contains__(self, name) or (isinstance(name, str) and bool(GROUP_MODEL_FILE.fullmatch(name)))


# Names an artifact directory may hold; a stale staging directory holding anything else is not ours.
KNOWN_FILES = _ArtifactFileNames({MODEL_FILE, MODEL_FILE + ".data", MANIFEST_FILE, COMPILE_LOG_FILE})

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex digest, size) of a file, read in blocks: memory stays flat for any model size."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def file_records(directory: Path, names: list[str]) -> dict[str, dict]:
    """The ``integrity.files`` entry of the manifest for ``names`` inside ``directory``."""
    records = {}
    for name in names:
        digest, size = sha256_file(directory / name)
        records[name] = {"bytes": size, "sha256": digest}
    return records


def canonical_json(data: Any) -> bytes:
    """One byte string per JSON value, whatever the key order or indentation of the file."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def seal(manifest: dict) -> dict:
    """``manifest`` with ``manifest_sha256`` set to the digest of everything else."""
    body = {key: value for key, value in manifest.items() if key != SEAL_KEY}
    return {**body, SEAL_KEY: hashlib.sha256(canonical_json(body)).hexdigest()}


def manifest_text(manifest: dict) -> str:
    """The bytes written to manifest.json: sealed, indented for people, NaN refused (it is not JSON)."""
    return json.dumps(seal(manifest), indent=2, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------------------
# Parsing: any bytes in, a checked manifest or one ArtifactError out
# ---------------------------------------------------------------------------------------------

def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_manifest(data: bytes | str, where: str) -> dict:
    """Parse and check a manifest.json; ``where`` names the file in messages.

    Order matters for the message a user sees: the format version is checked before the seal, so an
    artifact of an older ditq is told to recompile rather than called corrupt.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        manifest = json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{where} is not valid JSON ({_first_line(exc)}); recompile the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} holds a JSON {type(manifest).__name__}, not an object; recompile the artifact")
    check_format_version(manifest, where)
    check_seal(manifest, where)
    check_schema(manifest, where)
    return manifest


def check_format_version(manifest: dict, where: str) -> None:
    version = manifest.get("format_version")
    if version == FORMAT_VERSION and type(version) is int:
        return
    if type(version) is int and version < FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact format version {version} was written by an older ditq; this ditq "
                            f"reads version {FORMAT_VERSION}: recompile it with `ditq compile`")
    if type(version) is int:
        raise ArtifactError(f"{where}: artifact format version {version} is newer than this ditq reads "
                            f"({FORMAT_VERSION}): upgrade ditq")
    raise ArtifactError(f"{where} has no valid format_version; it is not a ditq manifest: recompile the artifact")


def check_seal(manifest: dict, where: str) -> None:
    stored = manifest.get(SEAL_KEY)
    if not isinstance(stored, str):
        raise ArtifactError(f"{where} has no {SEAL_KEY}; recompile the artifact")
    try:
        expected = seal(manifest)[SEAL_KEY]
    except (ValueError, RecursionError):
        expected = None
    if stored != expected:
        raise ArtifactError(f"{where} was modified after it was written (its {SEAL_KEY} does not match its "
                            "content); recompile the artifact")


def check_schema(manifest: dict, where: str) -> None:
    """Check every field ditq reads back, with the field's path in the message."""
    _require_str(manifest, "ditq_version", where)
    model = _require_dict(manifest, "model", where)
    _require_str(model, "class", where, "model.")
    from .families import FAMILIES

    family = FAMILIES.get(model["class"])
    if family is None:
        raise ArtifactError(f"{where}: model.class {model['class']!r} is no model family this ditq takes "
                            f"({', '.join(FAMILIES)}); recompile the artifact")
    config = _require_dict(model, "config", where, "model.")
    for key in family.required_config_ints:
        _require_positive_int(config, key, where, "model.config.")
    if config.get("out_channels") is not None:
        _require_positive_int(config, "out_channels", where, "model.config.")
    scheduler = _require_dict(manifest, "scheduler", where)
    if "num_train_timesteps" in scheduler:
        _require_positive_int(scheduler, "num_train_timesteps", where, "scheduler.")
    if "_class_name" in scheduler:
        _require_str(scheduler, "_class_name", where, "scheduler.")
    if "timestep_domain" in manifest:  # read back by Artifact.timestep_domain
        domain = _require_dict(manifest, "timestep_domain", where)
        for key in ("kind", "dtype"):
            _require_str(domain, key, where, "timestep_domain.")
        if not all(isinstance(domain.get(key), (int, float)) and not isinstance(domain.get(key), bool)
                   for key in ("low", "high")):
            raise ArtifactError(f"{where}: timestep_domain.low/high must be numbers; recompile the artifact")
    layers = manifest.get("quantized_layers")
    if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
        raise ArtifactError(f"{where}: quantized_layers must be a list of names; recompile the artifact")
    if manifest.get("fusion") is not None:
        _require_dict(manifest, "fusion", where)
    files = _file_names(manifest, "files", where)
    if MODEL_FILE not in files:
        raise ArtifactError(f"{where}: files does not list {MODEL_FILE}; recompile the artifact")
    unhashed = _file_names(manifest, "unhashed_files", where)
    if set(unhashed) & (set(files) | {MANIFEST_FILE}):
        raise ArtifactError(f"{where}: a file is listed both as hashed and unhashed; recompile the artifact")
    _check_integrity_records(manifest, files, where)


def _check_integrity_records(manifest: dict, files: list[str], where: str) -> None:
    integrity = _require_dict(manifest, "integrity", where)
    if integrity.get("algorithm") != "sha256":
        raise ArtifactError(f"{where}: integrity.algorithm must be sha256; recompile the artifact")
    records = _require_dict(integrity, "files", where, "integrity.")
    if sorted(records) != sorted(files):
        raise ArtifactError(f"{where}: integrity.files does not list exactly the files {files}; "
                            "recompile the artifact")
    for name, record in records.items():
        if not (isinstance(record, dict) and type(record.get("bytes")) is int and record["bytes"] >= 0
                and isinstance(record.get("sha256"), str) and _HEX64.fullmatch(record["sha256"])):
            raise ArtifactError(f"{where}: integrity.files[{name!r}] must hold bytes and a sha256; "
                                "recompile the artifact")


def _file_names(manifest: dict, key: str, where: str) -> list[str]:
    """A list of plain file names: no path separators, no '..', so checking never reads outside the artifact."""
    names = manifest.get(key)
    if not isinstance(names, list) or not all(isinstance(n, str) and _SAFE_NAME.fullmatch(n) for n in names) \
            or len(set(names)) != len(names):
        raise ArtifactError(f"{where}: {key} must be a list of distinct plain file names; recompile the artifact")
    return names


def _require_dict(data: dict, key: str, where: str, prefix: str = "") -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ArtifactError(f"{where}: {prefix}{key} must be an object; recompile the artifact")
    return value


def _require_str(data: dict, key: str, where: str, prefix: str = "") -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ArtifactError(f"{where}: {prefix}{key} must be a string; recompile the artifact")
    return value


def _require_positive_int(data: dict, key: str, where: str, prefix: str = "") -> int:
    value = data.get(key)
    if type(value) is not int or not 0 < value < 2**31:
        raise ArtifactError(f"{where}: {prefix}{key} must be a positive integer; recompile the artifact")
    return value


# ---------------------------------------------------------------------------------------------
# Verifying the files on disk against a checked manifest
# ---------------------------------------------------------------------------------------------

def verify_files(directory: Path, manifest: dict) -> None:
    """Raise an ArtifactError naming the first file that is missing or differs from the manifest."""
    for name, record in manifest["integrity"]["files"].items():
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            raise ArtifactError(f"{path} is missing; the artifact is incomplete: recompile it") from None
        if size != record["bytes"]:
            raise ArtifactError(f"{path} differs from the manifest ({size} bytes, expected {record['bytes']}); "
                                "the artifact is corrupt: recompile it")
        try:
            digest, _ = sha256_file(path)
        except OSError as exc:
            raise ArtifactError(f"cannot read {path}: {exc.strerror}") from None
        if digest != record["sha256"]:
            raise ArtifactError(f"{path} differs from the manifest (sha256 {digest[:12]}..., expected "
                                f"{record['sha256'][:12]}...); the artifact is corrupt: recompile it")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
