"""Reliability through the public CLI: every bad input is one line and exit 2, a tampered artifact is
caught by every entry point, a user's directory is never replaced without --force, leftovers of killed
compiles are removed (only ditq's own), directories follow the umask, and progress reaches logs."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

from faultlog import record
from ditq_compiler import Artifact
from ditq_compiler.cli import main
from ditq_compiler.errors import ArtifactError, CheckpointError
from ditq_compiler.integrity import manifest_text, seal

FAST = ["--calib-steps", "4", "--calib-samples", "2"]


def _error_line(capsys, command: str) -> str:
    """The one stderr line of a failed command; progress lines would be there too, so there must be none."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ditq {command}: error: ") or lines[0].startswith("ditq: error: "), lines[0]
    return lines[0]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.is_dir() else {}


class _RunsCode:
    """Unpickling this calls os.system: the file it ends up in must be refused without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def workspace(tmp_path, compiled_tiny, tiny_dit_dir):
    """Paths the bad-input table refers to: a valid artifact, a user's directory, a file, hostile .pt files."""
    art = tmp_path / "art"
    shutil.copytree(compiled_tiny[0].path, art)
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("the user's work\n")
    (tmp_path / "file.txt").write_text("a file\n")
    torch.save({"model": {}, "x": _RunsCode(tmp_path / "PWNED")}, tmp_path / "reduce.pt")
    import argparse

    # DiT's train.py keeps an argparse.Namespace under "args" (allowed); anywhere else it is refused
    torch.save({"model": {}, "opt": argparse.Namespace(lr=1e-4)}, tmp_path / "namespace.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04 not a checkpoint")
    return {"ART": art, "TINY": tiny_dit_dir, "OUT": tmp_path / "out", "USERDIR": user, "FILE": tmp_path / "file.txt",
            "REDUCE_PT": tmp_path / "reduce.pt", "NAMESPACE_PT": tmp_path / "namespace.pt",
            "GARBAGE_PT": tmp_path / "garbage.pt", "SAMPLES": tmp_path / "s.npz",
            "UNDER_FILE": tmp_path / "file.txt" / "s.npz", "root": tmp_path}


# (argv with placeholders, a fragment of the expected line). Every numeric option, out of range, not
# finite and not a number; paths that must not be overwritten; hostile and corrupt checkpoints.
BAD_INPUTS = [
    (["compile", "TINY", "-o", "OUT", "--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["compile", "TINY", "-o", "OUT", "--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    (["compile", "TINY", "-o", "OUT", "--guidance-scale", "-1"], "--guidance-scale must be a finite number"),
    (["compile", "TINY", "-o", "OUT", "--guidance-scale", "1e9"], "in [0, 100]"),
    (["compile", "TINY", "-o", "OUT", "--guidance-scale", "four"], "invalid float value"),
    (["compile", "TINY", "-o", "OUT", "--calib-steps", "0"], "--calib-steps must be at least 1"),
    (["compile", "TINY", "-o", "OUT", "--calib-steps", "5000"], "--calib-steps must be at most 1000"),
    (["compile", "TINY", "-o", "OUT", "--calib-steps", "2.5"], "invalid int value"),
    (["compile", "TINY", "-o", "OUT", "--calib-samples", "0"], "--calib-samples must be at least 1"),
    (["compile", "TINY", "-o", "OUT", "--calib-samples", "100000"], "--calib-samples must be at most 1024"),
    (["compile", "TINY", "-o", "OUT", "--seed", "-1"], "--seed must be at least 0"),
    (["compile", "TINY", "-o", "OUT", "--seed", str(2**64)], "--seed must be at most"),
    (["compile", "TINY", "-o", "OUT", "--groups", "0"], "--groups must be at least 1"),
    (["compile", "TINY", "-o", "OUT", "--groups", "7", *FAST], "--groups 7 needs at least as many calibration"),
    (["compile", "TINY", "-o", "OUT", "--groups", "x"], "invalid int value"),
    (["compile", "TINY", "-o", "OUT", "--format", "w3a1"], "unknown format 'w3a1'"),
    (["compile", "TINY", "-o", "OUT", "--recipe", "secret"], "unknown recipe 'secret'"),
    (["compile", "TINY", "-o", "OUT", "--layer", "no-equals-sign"], "must look like PATTERN=int8"),
    (["compile", "TINY", "-o", "OUT", "--frobnicate"], "unrecognized arguments"),
    (["compile", "TINY"], "required: -o"),
    (["compile", "TINY", "-o", "USERDIR", *FAST], "is not a ditq artifact"),
    (["compile", "TINY", "-o", "FILE", *FAST], "exists and is not a directory"),
    (["compile", "TINY", "-o", "FILE", "--force", *FAST], "exists and is not a directory"),
    (["compile", "TINY", "-o", "TINY", "--force", *FAST], "would replace the checkpoint"),
    (["compile", "/no/such/dit", "-o", "OUT"], "checkpoint not found"),
    (["compile", "USERDIR", "-o", "OUT"], "is not a DiT checkpoint directory"),
    (["compile", "REDUCE_PT", "-o", "OUT"], "holds pickled Python objects besides tensors (posix.system)"),
    (["compile", "NAMESPACE_PT", "-o", "OUT"], "holds pickled Python objects besides tensors (argparse.Namespace under 'opt'"),
    (["compile", "GARBAGE_PT", "-o", "OUT"], "cannot read"),
    (["run", "ART", "-o", "SAMPLES", "--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["run", "ART", "-o", "SAMPLES", "--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    (["run", "ART", "-o", "SAMPLES", "--guidance-scale", "-0.5"], "--guidance-scale must be a finite number"),
    (["run", "ART", "-o", "SAMPLES", "--steps", "0"], "--steps must be at least 1"),
    (["run", "ART", "-o", "SAMPLES", "--steps", "5000"], "--steps must be at most 1000"),
    (["run", "ART", "-o", "SAMPLES", "--steps", "many"], "invalid int value"),
    (["run", "ART", "-o", "SAMPLES", "--seed", "-3"], "--seed must be at least 0"),
    (["run", "ART", "-o", "SAMPLES", "--seed", str(2**70)], "--seed must be at most"),
    (["run", "ART", "-o", "SAMPLES", "--class-labels", "10"], "class label 10 is outside [0, 9]"),
    (["run", "ART", "-o", "SAMPLES", "--class-labels", "-1"], "class label -1 is outside [0, 9]"),
    (["run", "ART", "-o", "SAMPLES", "--class-labels"], "expected at least one argument"),
    (["run", "ART", "-o", "SAMPLES", "--provider", "tpu"], "invalid choice: 'tpu'"),
    (["run", "ART", "-o", "UNDER_FILE", "--steps", "1"], "cannot write the samples"),
    (["run", "/no/such/artifact", "-o", "SAMPLES"], "artifact directory not found"),
    (["run", "USERDIR", "-o", "SAMPLES"], "is not a ditq artifact"),
    (["verify", "/no/such/artifact"], "artifact directory not found"),
    (["verify", "USERDIR"], "is not a ditq artifact"),
    (["verify"], "required: ARTIFACT_DIR"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


def _fill(argv: list[str], paths: dict) -> list[str]:
    return [str(paths[a]) if a in paths else a for a in argv]


def _run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:  # argparse exits; main() returns for ditq's own errors
        return exit_info.code


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_every_bad_input_is_one_line_and_exit_2(argv, message, workspace, capsys):
    before = {name: _snapshot(workspace[name]) for name in ("ART", "USERDIR", "TINY")}
    code = _run_main(_fill(argv, workspace))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    clear = code == 2 and len(lines) == 1 and "Traceback" not in err and message in lines[0]
    lost = any(_snapshot(workspace[name]) != content for name, content in before.items())
    record("bad input", " ".join(argv), clear_error=clear, artifact_lost=lost)
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, lines
    assert lines[0].startswith(f"ditq {argv[0]}: error: ") or lines[0].startswith("ditq: error: "), lines[0]
    assert message in lines[0], lines[0]
    assert "weights_only=False" not in lines[0] and "add_safe_globals" not in lines[0]
    assert not lost, "a bad input changed an artifact, a user's directory or the checkpoint"
    assert not workspace["OUT"].exists() and not workspace["SAMPLES"].exists()
    assert not (workspace["root"] / "PWNED").exists(), "code from a checkpoint ran"


# ---------------------------------------------------------------------------------------------
# Pickled code in a .pt: refused, never run, never advice to run it
# ---------------------------------------------------------------------------------------------

def _hostile_payloads(marker: Path) -> dict[str, object]:
    import argparse
    import builtins
    import collections
    import subprocess

    import numpy as np

    class Calls:
        def __init__(self, function, args):
            self.function, self.args = function, args

        def __reduce__(self):
            return (self.function, self.args)

    return {
        "os.system": Calls(os.system, (f"touch {marker}",)),
        "eval": Calls(builtins.eval, (f"open({str(marker)!r}, 'w')",)),
        "exec": Calls(builtins.exec, (f"open({str(marker)!r}, 'w')",)),
        "subprocess.Popen": Calls(subprocess.Popen, (["touch", str(marker)],)),
        "argparse.Namespace": argparse.Namespace(epochs=3),
        "numpy array": np.zeros(3),
        "defaultdict": collections.defaultdict(list),
    }


@pytest.mark.parametrize("name", ["os.system", "eval", "exec", "subprocess.Popen", "argparse.Namespace",
                                  "numpy array", "defaultdict"])
def test_pt_with_pickled_code_or_objects_is_refused_without_running_it(name, tmp_path):
    from ditq_compiler.loading import load_checkpoint

    marker = tmp_path / "PWNED"
    path = tmp_path / "DiT.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _hostile_payloads(marker)[name]}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    clear = "holds pickled Python objects besides tensors" in message and "\n" not in message \
        and "weights_only" not in message and "safe_globals" not in message
    record("hostile .pt checkpoint", name, clear_error=clear and not marker.exists(), artifact_lost=None)
    assert "holds pickled Python objects besides tensors" in message and "\n" not in message
    assert "weights_only" not in message and "safe_globals" not in message
    assert not marker.exists()


def test_legacy_raw_pickle_with_reduce_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "PWNED"

    class Calls:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "DiT.pt"
    path.write_bytes(pickle.dumps({"x": Calls()}, protocol=2))
    from ditq_compiler.loading import load_checkpoint

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    record("hostile .pt checkpoint", "raw pickle calling os.system", artifact_lost=None,
           clear_error="weights_only" not in str(error.value) and not marker.exists())
    assert "weights_only" not in str(error.value) and not marker.exists()


# ---------------------------------------------------------------------------------------------
# Tampering: Artifact.load, `ditq run` and `ditq verify` all catch it, one line, exit 2
# ---------------------------------------------------------------------------------------------

def _flip(offset_of):
    def tamper(art: Path):
        data = bytearray((art / "model.onnx").read_bytes())
        data[offset_of(len(data))] ^= 0x01
        (art / "model.onnx").write_bytes(bytes(data))
    return tamper


def _append(art: Path):
    with open(art / "model.onnx", "ab") as handle:
        handle.write(b"\x00")


def _truncate(art: Path):
    data = (art / "model.onnx").read_bytes()
    (art / "model.onnx").write_bytes(data[: len(data) // 2])


def _edit_manifest(change, *, reseal: bool = False):
    def tamper(art: Path):
        manifest = json.loads((art / "manifest.json").read_text())
        change(manifest)
        text = manifest_text(manifest) if reseal else json.dumps(manifest, indent=2)
        (art / "manifest.json").write_text(text)
    return tamper


def _set(path: str, value):
    def change(manifest):
        *parents, last = path.split(".")
        target = manifest
        for key in parents:
            target = target[key]
        target[last] = value
    return change


def _truncated_model_resealed(art: Path):
    """A broken model.onnx whose manifest was rewritten to match (as a compile bug would): ONNX Runtime's
    own refusal must still be one line."""
    _truncate(art)
    from ditq_compiler.integrity import file_records

    manifest = json.loads((art / "manifest.json").read_text())
    manifest["integrity"]["files"] = file_records(art, manifest["files"])
    (art / "manifest.json").write_text(manifest_text(manifest))


TAMPERING = {
    "flip first byte of model.onnx": (_flip(lambda n: 0), "model.onnx differs from the manifest"),
    "flip middle byte of model.onnx": (_flip(lambda n: n // 2), "model.onnx differs from the manifest"),
    "flip last byte of model.onnx": (_flip(lambda n: n - 1), "model.onnx differs from the manifest"),
    "append a byte to model.onnx": (_append, "model.onnx differs from the manifest"),
    "truncate model.onnx": (_truncate, "model.onnx differs from the manifest"),
    "delete model.onnx": (lambda art: (art / "model.onnx").unlink(), "is not a ditq artifact"),
    "delete manifest.json": (lambda art: (art / "manifest.json").unlink(), "is not a ditq artifact"),
    "manifest: edit the scheduler": (_edit_manifest(_set("scheduler.num_train_timesteps", 10)), "was modified"),
    "manifest: edit a file hash": (
        _edit_manifest(lambda m: m["integrity"]["files"]["model.onnx"].update(sha256="0" * 64)), "was modified"),
    "manifest: drop the seal": (_edit_manifest(lambda m: m.pop("manifest_sha256")), "manifest_sha256"),
    "manifest: format version 1": (_edit_manifest(_set("format_version", 1)), "recompile it with `ditq compile`"),
    "manifest: format version 99": (_edit_manifest(_set("format_version", 99)), "newer than this ditq"),
    "manifest: not JSON": (lambda art: (art / "manifest.json").write_text("{not json"), "is not valid JSON"),
    "manifest: a JSON list": (lambda art: (art / "manifest.json").write_text("[1, 2]"), "not an object"),
    "manifest: truncated": (lambda art: (art / "manifest.json").write_text((art / "manifest.json").read_text()[:100]),
                            "is not valid JSON"),
    "manifest: resealed, model config a string": (
        _edit_manifest(_set("model.config", "big"), reseal=True), "model.config must be an object"),
    "manifest: resealed, path in files": (
        _edit_manifest(_set("files", ["../../etc/passwd"]), reseal=True), "plain file names"),
    "manifest: resealed, wrong size": (
        _edit_manifest(lambda m: m["integrity"]["files"]["model.onnx"].update(bytes=5), reseal=True),
        "model.onnx differs from the manifest"),
    "model.onnx truncated and manifest resealed": (_truncated_model_resealed, "ONNX Runtime cannot load"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_artifact_is_caught_everywhere(case, compiled_tiny, tmp_path, capsys):
    tamper, message = TAMPERING[case]
    art = tmp_path / "art"
    shutil.copytree(compiled_tiny[0].path, art)
    tamper(art)
    results = []
    if case != "model.onnx truncated and manifest resealed":  # its manifest is sound: ORT is what refuses
        with pytest.raises(ArtifactError, match=re.escape(message)) as error:
            Artifact.load(art)
        assert "\n" not in str(error.value)
        results.append(True)
        assert main(["verify", str(art)]) == 2
        results.append(message in _error_line(capsys, "verify"))
    samples = tmp_path / "s.npz"
    assert main(["run", str(art), "--steps", "2", "-o", str(samples), "--provider", "cpu"]) == 2
    results.append(message in _error_line(capsys, "run"))
    assert not samples.exists()
    record("tampered artifact", case, clear_error=all(results), artifact_lost=None, entry_points=len(results))
    assert all(results), results


def test_verify_says_ok_and_run_verifies_by_streaming_hashes(compiled_tiny, capsys, monkeypatch):
    from ditq_compiler import integrity

    artifact = compiled_tiny[0]
    assert main(["verify", str(artifact.path)]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    reads = []
    real_open = open

    class CountingReader:
        def __init__(self, handle):
            self.handle = handle

        def read(self, size=-1):
            reads.append(size)
            return self.handle.read(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def counting_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return CountingReader(handle) if str(path).endswith("model.onnx") else handle

    monkeypatch.setattr(integrity, "open", counting_open, raising=False)
    Artifact.load(artifact.path)
    assert reads and all(0 < size <= integrity.HASH_BLOCK for size in reads)  # blocks, never the whole file


def test_manifest_is_deterministic_and_times_live_in_the_unhashed_log(compiled_tiny):
    artifact = compiled_tiny[0]
    manifest = artifact.manifest
    assert manifest["format_version"] == 2 and manifest["unhashed_files"] == ["compile_log.json"]
    assert set(manifest["integrity"]["files"]) == set(manifest["files"]) == {"model.onnx"}
    assert "seconds" not in json.dumps(manifest)
    assert not {"compile_seconds", "timestamp", "created", "date"} & set(manifest)
    log = artifact.compile_log
    assert log["compile_seconds"] > 0 and [p["name"] for p in log["passes"]] == [p["name"] for p in manifest["passes"]]
    assert seal(manifest) == manifest  # the seal is over everything else


# ---------------------------------------------------------------------------------------------
# -o: never a user's directory, umask respected, leftovers cleaned (only ours)
# ---------------------------------------------------------------------------------------------

def test_force_replaces_a_users_directory_and_only_then(tiny_dit_dir, tmp_path, capsys):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert main(["compile", str(tiny_dit_dir), "-o", str(user), *FAST]) == 2
    assert "pass --force" in _error_line(capsys, "compile") and (user / "notes.txt").read_text() == "mine"
    assert main(["compile", str(tiny_dit_dir), "-o", str(user), "--force", *FAST]) == 0
    assert sorted(p.name for p in user.iterdir()) == ["compile_log.json", "manifest.json", "model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["userdir"]  # nothing left beside it


def test_an_empty_directory_or_an_older_artifact_is_replaced_without_force(tmp_path):
    from ditq_compiler.staging import staging_directory

    empty, older = tmp_path / "empty", tmp_path / "older"
    empty.mkdir()
    older.mkdir()
    (older / "model.onnx").write_bytes(b"v1")
    (older / "manifest.json").write_text('{"format_version": 1}')
    for target in (empty, older):
        with staging_directory(target) as staging:
            (staging / "model.onnx").write_bytes(b"new")
        assert sorted(p.name for p in target.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
def test_artifact_directories_follow_the_umask(umask, mode, tmp_path):
    from ditq_compiler.staging import staging_directory

    old = os.umask(umask)
    try:
        with staging_directory(tmp_path / "art") as staging:
            (staging / "model.onnx").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "art" / "model.onnx").stat().st_mode) == mode & 0o666


def test_only_ditqs_own_stale_leftovers_are_removed(tmp_path):
    import fcntl

    from ditq_compiler.staging import staging_directory

    def leftover(name: str, files: dict[str, bytes]) -> Path:
        path = tmp_path / name
        path.mkdir()
        for file, content in files.items():
            (path / file).write_bytes(content)
        return path

    stale = leftover(".art.tmp-abcd1234", {"model.onnx": b"partial"})
    stale_old = leftover(".art.old-_zz9y8x7", {"model.onnx": b"old", "manifest.json": b"{}"})
    empty_stale = leftover(".art.tmp-00000000", {})
    live = leftover(".art.tmp-livelive", {"model.onnx": b"being written"})
    users = leftover(".art.tmp-notes123", {"notes.txt": b"mine"})
    other_target = leftover(".other.tmp-abcd1234", {"model.onnx": b"x"})
    wrong_name = leftover(".art.tmp-short", {"model.onnx": b"x"})
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a compile still writing there
    try:  # the stale leftovers are removed first; then the live compile to the same -o makes this one refuse
        with pytest.raises(ArtifactError, match="another ditq compile is writing"):
            with staging_directory(tmp_path / "art") as staging:
                (staging / "model.onnx").write_bytes(b"new")
    finally:
        os.close(lock)
    assert not (tmp_path / "art").exists()
    for path in (stale, stale_old, empty_stale):
        assert not path.exists(), path
    for path in (live, users, other_target, wrong_name):
        assert path.exists(), path
    with staging_directory(tmp_path / "art") as staging:  # the live compile died: its directory is stale now
        (staging / "model.onnx").write_bytes(b"new")
    assert (tmp_path / "art" / "model.onnx").read_bytes() == b"new" and not live.exists()
    for path in (users, other_target, wrong_name):
        assert path.exists(), path
    assert (users / "notes.txt").read_bytes() == b"mine"


def test_a_failed_fallback_rename_puts_the_old_artifact_back(tmp_path, monkeypatch):
    from ditq_compiler import staging
    from ditq_compiler.staging import WriteError, leftovers, staging_directory

    target = tmp_path / "art"
    with staging_directory(target) as directory:
        (directory / "model.onnx").write_bytes(b"old")
    monkeypatch.setattr(staging, "exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(source, destination):
        calls.append(source)
        if len(calls) == 2:  # staging -> target, after target -> backup
            raise OSError(28, "No space left on device", str(destination))
        real_rename(source, destination)

    monkeypatch.setattr(staging.os, "rename", rename)
    with pytest.raises(WriteError, match="disk full or a file-size limit"):
        with staging_directory(target, force=True) as directory:  # force: "old" has no manifest
            (directory / "model.onnx").write_bytes(b"new")
    assert (target / "model.onnx").read_bytes() == b"old" and leftovers(target) == []


# ---------------------------------------------------------------------------------------------
# Progress in logs
# ---------------------------------------------------------------------------------------------

def test_plain_progress_is_terse_and_silent_for_short_loops():
    from ditq_compiler.progress import PlainReporter

    def lines_for(durations_per_step, steps):
        stream, now = io.StringIO(), [0.0]
        reporter = PlainReporter("calibrating", steps, stream=stream, clock=lambda: now[0], quiet=2.0, every=10.0)
        for done in range(1, steps + 1):
            now[0] += durations_per_step
            reporter.update(done)
        reporter.close(steps)
        return stream.getvalue().splitlines()

    assert lines_for(0.01, 100) == []  # one second in all: nothing
    long = lines_for(1.0, 100)  # 100 s: a line per tenth after the first two seconds, and the end
    assert 8 <= len(long) <= 11 and long[-1] == "ditq: calibrating 100/100 (100%), 100 s"
    assert all(line.startswith("ditq: calibrating ") for line in long)
    slow = lines_for(30.0, 3)  # few slow steps: every step is more than a tenth and more than 10 s
    assert len(slow) == 3


def test_heartbeat_names_the_phase_in_a_silent_command(capsys):
    import time

    from ditq_compiler.progress import heartbeat, phase

    with heartbeat("compiling", every=0.2):
        with phase("exporting"):
            time.sleep(0.5)
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("ditq: exporting, ") for line in err)
    with heartbeat("compiling", every=5.0):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""  # a short command: no progress, so an error stays one line
