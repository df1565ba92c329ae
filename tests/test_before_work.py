"""A compile refuses what it can know is wrong before its long work, and says where its time went.

* Output problems (a read-only file system, a parent that cannot be created, a mount point, a second compile to
  the same ``-o``, too little free disk) are one line and exit 2, and calibration never starts: the pass is
  replaced by one that records being called, and no calibration progress line may be printed.
* Every compile's ``compile_log.json`` holds its phase table (the passes nested under theirs), the CLI prints
  it, and ``inspect`` writes it into its dump.
* The numeric check runs rows in batches: what it compares is unchanged, and a wrong artifact is still refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from ditq_compiler import staging as staging_module
from ditq_compiler.cli import main
from ditq_compiler.passes.calibrate import CollectActivationStats

FAST = ["--calib-steps", "4", "--calib-samples", "2"]


@pytest.fixture
def calibration_calls(monkeypatch) -> list[int]:
    """Calls of the calibration pass: a test that refuses before the work expects none."""
    calls: list[int] = []
    original = CollectActivationStats.run

    def recorded(self, gm, ctx):
        calls.append(1)
        return original(self, gm, ctx)

    monkeypatch.setattr(CollectActivationStats, "run", recorded)
    monkeypatch.delenv("DITQ_PROGRESS_SECONDS", raising=False)  # the default: a refusal stays one line
    return calls


def _refused(capsys, argv: list[str], calls: list[int]) -> str:
    """Run the CLI; it must exit 2 with one error line, before calibration and without progress lines."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ditq compile: error: "), lines
    assert "Traceback" not in err and "calibrating" not in err
    assert calls == [], "calibration started before the refusal"
    return lines[0]


def test_a_read_only_output_is_refused_before_calibration(tiny_dit_dir, tmp_path, calibration_calls, capsys,
                                                          monkeypatch):
    read_only = tmp_path / "mounted-ro"
    read_only.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # a read-only file system (tests run as root, where chmod would not stop us)
        if Path(path).parent == read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(staging_module.os, "mkdir", mkdir)
    line = _refused(capsys, ["compile", str(tiny_dit_dir), "-o", str(read_only / "art"), *FAST], calibration_calls)
    assert "cannot write the artifact" in line and "Read-only file system" in line and "writable -o" in line
    assert list(read_only.iterdir()) == []


def test_a_parent_that_cannot_be_created_is_refused_before_calibration(tiny_dit_dir, tmp_path, calibration_calls,
                                                                      capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    line = _refused(capsys, ["compile", str(tiny_dit_dir), "-o", str(a_file / "art"), *FAST], calibration_calls)
    assert "cannot write the artifact" in line and "Not a directory" in line
    assert a_file.read_text() == "mine"


def test_a_full_disk_is_refused_before_calibration_and_keeps_the_old_artifact(compiled_tiny, tiny_dit_dir, tmp_path,
                                                                             calibration_calls, capsys, monkeypatch):
    existing = tmp_path / "art"
    shutil.copytree(compiled_tiny[0].path, existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    nested = tmp_path / "new" / "deeper" / "art"
    monkeypatch.setattr(staging_module.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    for target in (existing, nested):
        line = _refused(capsys, ["compile", str(tiny_dit_dir), "-o", str(target), *FAST], calibration_calls)
        assert line.startswith("ditq compile: error: not enough free disk space for the artifact")
        assert "0.0 MB free" in line and "choose another -o" in line
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert not (tmp_path / "new").exists(), "the parents a failed compile created are removed again"
    assert staging_module.leftovers(existing) == []


def test_an_error_of_the_work_itself_is_not_blamed_on_the_output(tiny_dit_dir, tmp_path, capsys, monkeypatch):
    """The staging directory is open for the whole compile; an OSError of the work (here: a checkpoint that cannot
    be read) is reported as what it is, not as "cannot write the artifact ... choose a writable -o"."""
    from ditq_compiler import pipeline

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tiny_dit_dir / "config.json"))

    monkeypatch.setattr(pipeline, "load_checkpoint", unreadable)
    with pytest.raises(PermissionError):
        main(["compile", str(tiny_dit_dir), "-o", str(tmp_path / "art"), *FAST])
    assert not (tmp_path / "art").exists() and staging_module.leftovers(tmp_path / "art") == []


def test_a_mount_point_is_refused_before_loading(tiny_dit_dir, tmp_path, calibration_calls, capsys, monkeypatch):
    mount = tmp_path / "volume"
    mount.mkdir()
    monkeypatch.setattr(staging_module.os.path, "ismount", lambda path: Path(path) == mount)
    line = _refused(capsys, ["compile", str(tiny_dit_dir), "-o", str(mount), *FAST], calibration_calls)
    assert "is a mount point" in line and f"-o {mount / 'artifact'}" in line


def test_a_second_compile_to_the_same_output_is_refused_while_the_first_runs(tiny_dit_dir, tmp_path,
                                                                            calibration_calls, capsys):
    target = tmp_path / "art"
    with staging_module.staging_directory(target) as first:  # a live compile: its staging directory is locked
        (first / "model.onnx").write_bytes(b"first")
        line = _refused(capsys, ["compile", str(tiny_dit_dir), "-o", str(target), *FAST], calibration_calls)
        assert "another ditq compile is writing" in line and "wait for it to finish" in line
        assert first.exists()
        (first / "manifest.json").write_text(json.dumps({"format_version": 1}))
    assert (target / "model.onnx").read_bytes() == b"first", "the first compile still lands"
    assert staging_module.leftovers(target) == []


def test_a_missing_parent_is_created_as_before(compiled_tiny, tiny_dit_dir, tmp_path, capsys):
    target = tmp_path / "out" / "nested" / "art"
    assert main(["compile", str(tiny_dit_dir), "-o", str(target), *FAST]) == 0
    assert (target / "model.onnx").is_file()


def test_every_compile_logs_and_prints_its_phase_table(compiled_tiny, tiny_dit_dir, tmp_path, capsys):
    log = compiled_tiny[0].compile_log
    rows = log["phases"]
    names = [row["name"] for row in rows]
    for phase in ("loading the checkpoint", "tracing", "quantization passes", "pass calibrate", "exporting to ONNX",
                  "lowering for the cpu target", "writing the artifact", "checking ONNX Runtime's fusion",
                  "checking ONNX Runtime's numerics against the torch graph", "other"):
        assert phase in names, names
    depth = {row["name"]: row["depth"] for row in rows}
    assert depth["pass calibrate"] == 1 and depth["quantization passes"] == 0
    passes = [row for row in rows if row["name"].startswith("pass ")]
    assert [row["name"][len("pass "):] for row in passes] == [p["name"] for p in log["passes"]]
    passes_phase = next(row["seconds"] for row in rows if row["name"] == "quantization passes")
    assert sum(row["seconds"] for row in passes) <= passes_phase + 0.01
    named = sum(row["seconds"] for row in rows if row["depth"] == 0 and row["name"] != "other")
    other = next(row["seconds"] for row in rows if row["name"] == "other")
    assert named <= log["compile_seconds"] + 0.01 and other < 0.5 * log["compile_seconds"], (named, other, log)

    assert main(["compile", str(tiny_dit_dir), "-o", str(tmp_path / "art"), *FAST]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("wrote ") and "phase" not in captured.out  # stdout: the result only
    table = [line for line in captured.err.splitlines() if line.startswith("ditq: ")]
    assert any(line.split()[1:3] == ["phase", "seconds"] for line in table), table
    assert any("pass calibrate" in line for line in table) and table[-1].split()[1] == "total"


def test_inspect_writes_the_phase_table_into_its_dump(tiny_dit_dir, tmp_path):
    from ditq_compiler.config import CalibrationConfig, CompileConfig
    from ditq_compiler.inspect import inspect_checkpoint

    config = CompileConfig(calibration=CalibrationConfig(steps=4, samples=2))
    inspect_checkpoint(tiny_dit_dir, tmp_path / "dump", config)
    timings = (tmp_path / "dump" / "timings.txt").read_text()
    phases = timings.split("## phases of the whole inspect (wall clock)\n", 1)[1].splitlines()
    assert phases[0].split() == ["phase", "seconds", "share"]
    for phase in ("  pass calibrate", "exporting to ONNX", "per-layer error analysis", "total"):
        assert any(line.startswith(phase) for line in phases), phases


def test_the_batched_numeric_check_compares_the_same_rows_and_still_refuses_a_wrong_model(compiled_tiny,
                                                                                           monkeypatch):
    """Batching the rows leaves the agreement the check measures unchanged (to float rounding: 1e-6 of the output
    range) and its verdict the same, and a model that computes something else is still caught."""
    import numpy as np

    from ditq_compiler import numerics
    from ditq_compiler.runtime import create_session

    artifact, result = compiled_tiny
    session = create_session(artifact.path / "model.onnx", "cpu", weight_range=artifact.weight_range)
    inputs = result.context.check_inputs_by_group(per_group=None)
    signature = result.context.signature
    batched = numerics.check_against_torch(session, result.graph_module, inputs, signature)
    monkeypatch.setattr(numerics, "BATCH_ROWS", 1)
    one_by_one = numerics.check_against_torch(session, result.graph_module, inputs, signature)
    assert batched.ok and one_by_one.ok
    for group, check in batched.per_group.items():
        other = one_by_one.per_group[group]
        assert check.timesteps == other.timesteps
        assert abs(check.agreement.max_error - other.agreement.max_error) <= 1e-6
        assert abs(check.agreement.rel_l2 - other.agreement.rel_l2) <= 1e-6
        # the sensitivity is a random draw (noise seeded per batch), so only its verdict must be the same
        assert check.sensitivity.rel_l2 > 0 and other.sensitivity.rel_l2 > 0 and check.ok == other.ok

    class Wrong:  # ONNX Runtime's output, off by 5% of every value
        def run(self, names, feeds):
            return [out * np.float32(1.05) for out in session.run(names, feeds)]

    monkeypatch.setattr(numerics, "BATCH_ROWS", 8)
    wrong = numerics.check_against_torch(Wrong(), result.graph_module, inputs, signature)
    assert not wrong.ok


def test_the_command_line_answers_help_and_argument_errors_without_importing_torch():
    """``ditq --help`` and an argument error must not pay for torch's import (seconds on a busy machine)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom ditq_compiler.cli import main\n"
             "for argv in (['--help'], ['compile', '--help'], ['compile', '--format', 'w8a8']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('torch' in sys.modules, 'onnxruntime' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stdout + done.stderr
