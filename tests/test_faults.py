"""Fault suite: what a compile leaves when it is killed or the disk fills up, and whether two compiles
of the same inputs give the same bytes.

* SIGKILL at random moments of a real ``python -m ditq_compiler.cli compile`` (times spread over the
  length of a full compile, measured first, from a fixed seed; two targets side by side, which halves
  the wall time on two cores): the previous artifact stays byte-identical and verifies, nothing
  partial is ever at the target, and the next compile removes the leftovers.
* SIGKILL inside the replacement itself, where a random kill of a whole compile rarely lands: many
  kills of a forked writer that replaces an artifact in a loop, with the atomic exchange and with the
  two-rename fallback, plus kills placed exactly between the two renames and right after the exchange.
* A full disk: a file-size limit (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored so the write fails with
  ``EFBIG``) in the compiling process: one error line, exit 2, the old artifact intact.
* Byte-identical rebuild: every hashed file of two compiles of the same checkpoint, options and seed
  (the two targets' first compiles).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from faultlog import record
from ditq_compiler import Artifact
from ditq_compiler import staging as staging_module
from ditq_compiler.artifact import write_manifest
from ditq_compiler.staging import leftovers, staging_directory

FAST = ["--calib-steps", "4", "--calib-samples", "2"]
SEED = 20240917
KILL_TRIALS = 8  # spread evenly; two more are placed in phases too short for an even spread
PROGRESS_LINE = re.compile(r"ditq: (?P<phase>[^,\d]+?)(?: \d+/\d+ \(\d+%\))?, \d+ s$")
FILE_SIZE_LIMIT = 64 * 1024  # below model.onnx of the tiny DiT (about 180 kB)


def _compile_command(checkpoint: Path, target: Path) -> list[str]:
    return [sys.executable, "-m", "ditq_compiler.cli", "compile", str(checkpoint), "-o", str(target), *FAST]


def _child_env(progress_seconds: str = "0.1") -> dict[str, str]:
    """Frequent progress lines: the last one a killed child printed tells which phase it was in. One
    thread per child: two children share the two cores, and the tiny model gains nothing from more."""
    return {**os.environ, "DITQ_PROGRESS_SECONDS": progress_seconds, "OMP_NUM_THREADS": "1"}


def _hashed_files(target: Path) -> dict[str, bytes]:
    """The files that must be identical between compiles: the manifest and every file it hashes."""
    manifest = json.loads((target / "manifest.json").read_text())
    return {name: (target / name).read_bytes() for name in ["manifest.json", *manifest["files"]]}


def _last_phase(stderr: str) -> str:
    """The phase a child was in, from its last progress line. The pipeline names only calibration and the
    artifact's writing, so its "compiling" lines are split at calibration: loading and tracing before it,
    the quantization passes and the ONNX export after it."""
    phases = [m.group("phase") for line in stderr.splitlines() if (m := PROGRESS_LINE.match(line.strip()))]
    if not phases:
        return "starting (imports)"
    if phases[-1] == "compiling":
        return "quantizing, exporting" if "calibrating" in phases else "loading, tracing"
    return phases[-1]


@dataclass
class Lane:
    """One target directory of the kill trials, with the files its first compile wrote."""

    root: Path
    target: Path
    files: dict[str, bytes]
    stderr: str
    known_leftovers: set = field(default_factory=set)  # those there before the current child started


def _run_side_by_side(commands: list[list[str]], cwds: list[Path], **popen) -> list[tuple[int, str, float]]:
    """Start the commands together; (exit code, stderr, seconds) of each. Two lanes of trials halve the wall
    time of the suite on a machine with two cores."""
    start = time.monotonic()
    children = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
                for c, cwd in zip(commands, cwds)]
    results = []
    for child in children:
        _, err = child.communicate(timeout=600)
        results.append((child.returncode, err, time.monotonic() - start))
    return results


@pytest.fixture(scope="module")
def lanes(tiny_dit_dir, tmp_path_factory) -> tuple[list[Lane], float]:
    """Two full compiles through the CLI in subprocesses, side by side, timed: the previous artifacts of the
    trials, and (being two compiles of the same inputs) the byte-identical rebuild check."""
    roots = [tmp_path_factory.mktemp(f"lane{index}") for index in range(2)]
    targets = [root / "art" for root in roots]
    results = _run_side_by_side([_compile_command(tiny_dit_dir, t) for t in targets], roots, env=_child_env())
    for code, err, _ in results:
        assert code == 0, err
    seconds = max(elapsed for _, _, elapsed in results)
    return [Lane(root, target, _hashed_files(target), err)
            for root, target, (_, err, _) in zip(roots, targets, results)], seconds


def test_compile_prints_progress_lines_when_stderr_is_not_a_terminal(lanes):
    lines = lanes[0][0].stderr.strip().splitlines()
    assert lines and all(line.startswith("ditq: ") for line in lines), lines
    assert any(PROGRESS_LINE.match(line) for line in lines)


def test_rebuild_gives_byte_identical_hashed_files(lanes):
    """Two compiles of the same checkpoint, options and seed (to two directories): every hashed file,
    manifest.json included, is the same bytes; only compile_log.json may differ."""
    first, second = lanes[0][0].files, lanes[0][1].files
    differences = [f"{name}: {_describe_difference(name, first[name], second.get(name))}"
                   for name in first if second.get(name) != first[name]]
    assert set(first) == set(second) and not differences, differences


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments of a real compile
# ---------------------------------------------------------------------------------------------

@dataclass
class KillAt:
    """When to kill a child: ``delay`` seconds after ``armed`` first holds (from its start when None)."""

    delay: float
    armed: Callable[[Lane, str], bool] | None = None
    label: str = ""
    since: float | None = None

    def due(self, elapsed: float, lane: Lane, stderr: str) -> bool:
        if self.since is None and (self.armed is None or self.armed(lane, stderr)):
            self.since = 0.0 if self.armed is None else elapsed
        return self.since is not None and elapsed - self.since >= self.delay


def _calibrating(lane: Lane, stderr: str) -> bool:
    return "ditq: calibrating" in stderr


def _staging(lane: Lane, stderr: str) -> bool:
    """The current child started writing files into its staging directory (older leftovers do not count; the
    directory itself is made, empty, when the compile starts, to refuse a bad -o before the work)."""
    return any(".tmp-" in path.name and path not in lane.known_leftovers and _holds_files(path)
               for path in leftovers(lane.target))


def _holds_files(path: Path) -> bool:
    try:
        return any(path.iterdir())
    except OSError:
        return False


def _kill_side_by_side(commands: list[list[str]], lanes: list[Lane], kills: list[KillAt]) -> list[str]:
    """Start one compile per lane and SIGKILL each when its KillAt is due (polled every 5 ms); the phase
    each was in, or 'finished' for one that completed first."""
    logs = [lane.root / "child.stderr" for lane in lanes]
    handles = [open(log, "w") for log in logs]
    for lane in lanes:
        lane.known_leftovers = set(leftovers(lane.target))
    start = time.monotonic()
    children = [subprocess.Popen(c, cwd=lane.root, env=_child_env(), stdout=subprocess.DEVNULL, stderr=h)
                for c, lane, h in zip(commands, lanes, handles)]
    phases: list[str | None] = [None] * len(children)
    while None in phases:
        elapsed = time.monotonic() - start
        for index, (child, lane, kill, log) in enumerate(zip(children, lanes, kills, logs)):
            if phases[index] is not None:
                continue
            if child.poll() is not None:
                phases[index] = "finished"
            elif kill.due(elapsed, lane, log.read_text()):
                writing = _staging(lane, "")
                child.send_signal(signal.SIGKILL)
                child.wait()
                if writing:
                    phases[index] = "writing the artifact"
                elif kill.armed is _staging:
                    phases[index] = "after the replacement"
                else:
                    phases[index] = _last_phase(log.read_text())
        time.sleep(0.005)
    for handle in handles:
        handle.close()
    return phases


def test_sigkill_at_random_moments_keeps_the_previous_artifact(lanes, tiny_dit_dir, capsys):
    """KILL_TRIALS kills spread evenly over a full compile's length, plus one in calibration and one inside
    the artifact's writing (phases too short for an even spread to hit reliably). The next compile (run
    in-process through the same CLI entry point: what it must do is the same, without the imports' cost)
    removes the leftovers."""
    lane_list, seconds = lanes
    rng = random.Random(SEED)
    kills = [KillAt(seconds * (trial + rng.random()) / KILL_TRIALS) for trial in range(KILL_TRIALS)]
    kills += [KillAt(rng.uniform(0.0, 0.5), _calibrating, "after calibration started"),
              KillAt(rng.uniform(0.0, 0.05), _staging, "after the artifact's first file appeared")]
    phases = []
    for pair in range(0, len(kills), len(lane_list)):
        pair_kills = kills[pair:pair + len(lane_list)]
        commands = [_compile_command(tiny_dit_dir, lane.target) for lane in lane_list]
        pair_phases = _kill_side_by_side(commands, lane_list, pair_kills)
        for lane, kill, phase in zip(lane_list, pair_kills, pair_phases):
            intact = lane.target.is_dir() and _hashed_files(lane.target) == lane.files
            Artifact.load(lane.target)  # verifies every hash
            phases.append(phase)
            when = f"{kill.delay:.2f} s {kill.label}" if kill.label else f"at {kill.delay:.1f} s of {seconds:.1f} s"
            record("SIGKILL during a compile (CLI subprocess)", f"kill {when}", clear_error=None,
                   artifact_lost=not intact, phase=phase)
            assert intact, f"the artifact changed after a kill {when} ({phase})"
    print(f"phases at the kills: {phases}")
    assert len(set(phases)) >= 3, phases  # the kills did not all land in one phase

    # Leftovers of ditq's naming (a kill inside the save, or an older ditq's mkdtemp) go with the next compile.
    for lane in lane_list:
        planted = lane.target.parent / f".{lane.target.name}.tmp-k1ll3d_x"
        planted.mkdir(exist_ok=True)
        (planted / "model.onnx").write_bytes(lane.files["model.onnx"][:1000])
    from ditq_compiler.cli import main

    for lane in lane_list:
        assert main(_compile_command(tiny_dit_dir, lane.target)[3:]) == 0
        assert leftovers(lane.target) == [], leftovers(lane.target)
        assert _hashed_files(lane.target) == lane.files


# ---------------------------------------------------------------------------------------------
# SIGKILL inside the replacement
# ---------------------------------------------------------------------------------------------

MINIMAL_MANIFEST = {
    "ditq_version": "fault-suite", "quantized_layers": [], "fusion": None, "files": ["model.onnx"], "scheduler": {},
    "model": {"class": "DiTTransformer2DModel", "config": {"in_channels": 4, "sample_size": 8, "num_embeds_ada_norm": 10}},
}


def _write_artifact(target: Path, payload: bytes) -> None:
    """What compile does around the ONNX export: stage, write in blocks, hash, seal, replace."""
    with staging_directory(target) as staging:
        with open(staging / "model.onnx", "wb") as handle:
            for start in range(0, len(payload), 1 << 16):
                handle.write(payload[start:start + (1 << 16)])
        write_manifest(staging, MINIMAL_MANIFEST, {"compile_seconds": 0.0})


def _fork(body) -> int:
    """Run ``body`` in a forked child that never returns into pytest."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _without_exchange() -> None:
    staging_module.exchange = lambda a, b: False  # in the forked child only


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_sigkill_inside_the_replacement_never_loses_the_artifact(mode, tmp_path):
    target = tmp_path / "art"
    payloads = [bytes([1]) * 1_500_000, bytes([2]) * 1_000_000]
    _write_artifact(target, payloads[0])
    rng = random.Random(SEED)
    recovered = 0

    def replace_forever():
        if mode == "fallback":
            _without_exchange()
        index = 1
        while True:
            _write_artifact(target, payloads[index % 2])
            index += 1

    for trial in range(25):
        pid = _fork(replace_forever)
        time.sleep(rng.uniform(0.005, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        missing = not target.exists()
        recovered += missing
        artifact = Artifact.load(target)  # puts back a fallback replacement killed between its renames
        intact = artifact.model_path.read_bytes() in payloads
        record(f"SIGKILL inside the replacement ({mode})", f"trial {trial}", clear_error=None,
               artifact_lost=not intact, target_was_missing=missing)
        assert intact
    _write_artifact(target, payloads[0])
    assert leftovers(target) == []
    assert mode == "fallback" or recovered == 0  # the exchange has no window where the target is missing


def test_kill_between_the_two_renames_of_the_fallback_is_recovered(tmp_path):
    target = tmp_path / "art"
    _write_artifact(target, b"old" * 1000)

    def die_between_renames():
        _without_exchange()
        real_rename, calls = os.rename, []

        def rename(source, destination):
            calls.append(source)
            if len(calls) == 2:  # the old artifact is at .art.old-*, the new one not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(source, destination)

        os.rename = rename
        _write_artifact(target, b"new" * 1000)

    _, status = os.waitpid(_fork(die_between_renames), 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not target.exists() and len(leftovers(target)) == 2  # the window the fallback has
    assert Artifact.load(target).model_path.read_bytes() == b"old" * 1000  # loading puts it back
    record("SIGKILL inside the replacement (fallback)", "between the two renames, recovered by load",
           clear_error=None, artifact_lost=False)

    _, status = os.waitpid(_fork(die_between_renames), 0)
    _write_artifact(target, b"newer" * 1000)  # a compile recovers first, then replaces
    assert (target / "model.onnx").read_bytes() == b"newer" * 1000 and leftovers(target) == []
    record("SIGKILL inside the replacement (fallback)", "between the two renames, recovered by compile",
           clear_error=None, artifact_lost=False)


def test_kill_right_after_the_exchange_leaves_the_new_artifact_and_a_leftover(tmp_path):
    target = tmp_path / "art"
    _write_artifact(target, b"old" * 1000)

    def die_after_exchange():
        real = staging_module.exchange

        def exchange(a, b):
            swapped = real(a, b)
            os.kill(os.getpid(), signal.SIGKILL)
            return swapped

        staging_module.exchange = exchange
        _write_artifact(target, b"new" * 1000)

    _, status = os.waitpid(_fork(die_after_exchange), 0)
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert Artifact.load(target).model_path.read_bytes() == b"new" * 1000
    assert len(leftovers(target)) == 1  # the old artifact at the staging name
    _write_artifact(target, b"old" * 1000)
    assert leftovers(target) == []
    record("SIGKILL inside the replacement (exchange)", "right after the exchange", clear_error=None,
           artifact_lost=False)


# ---------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------

def _limit_file_size():
    """In the child: writes past the limit fail with EFBIG instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_full_disk_is_one_error_line_and_keeps_the_old_artifact(lanes, tiny_dit_dir, tmp_path):
    lane = lanes[0][0]
    existing = tmp_path / "art"
    shutil.copytree(lane.target, existing)
    done = subprocess.run(_compile_command(tiny_dit_dir, existing), cwd=tmp_path, env=_child_env("10"),
                          preexec_fn=_limit_file_size, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.strip().splitlines() if not line.startswith("ditq: ")]  # no progress
    clear = done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr \
        and "cannot write the artifact" in errors[0] and "File too large" in errors[0]
    lost = _hashed_files(existing) != lane.files
    record("full disk (RLIMIT_FSIZE)", "-o an existing artifact", clear_error=clear, artifact_lost=lost)
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert errors[0].startswith("ditq compile: error: cannot write the artifact") and clear, errors[0]
    assert "disk full or a file-size limit" in errors[0]
    assert not lost and leftovers(existing) == []
    Artifact.load(existing)


def _describe_difference(name: str, a: bytes, b: bytes | None) -> str:
    """Which part differs, so a failure says what to fix (a manifest key, an initializer, a node)."""
    if b is None:
        return "missing"
    if name == "manifest.json":
        first, second = json.loads(a), json.loads(b)
        return "keys " + ", ".join(k for k in sorted(set(first) | set(second)) if first.get(k) != second.get(k))
    if name.endswith(".onnx"):
        import onnx

        first, second = onnx.load_from_string(a), onnx.load_from_string(b)
        inits = {i.name: i.SerializeToString() for i in second.graph.initializer}
        changed = [i.name for i in first.graph.initializer if inits.get(i.name) != i.SerializeToString()]
        nodes = [n.name for n, m in zip(first.graph.node, second.graph.node) if n != m]
        return (f"{len(changed)} initializers differ (e.g. {changed[:3]}), {len(nodes)} nodes differ "
                f"(e.g. {nodes[:3]}), metadata equal: {first.metadata_props == second.metadata_props}")
    return f"{len(a)} vs {len(b)} bytes"
