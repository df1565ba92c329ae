"""Compile time by phase, before and after a change, in one run: writes the ``compile-phases`` block of
docs/benchmarks.md.

Each compile runs ``ditq compile`` in a child process of the build under test (the working tree, and a git
revision checked out beside it as the "before" build), one at a time. The child samples ditq's current progress
phase every 20 ms (the names both builds give their phases), so both builds are timed the same way; the parent
times the whole process, imports included. Each case also states whether the two builds wrote the same
``model.onnx`` bytes. The CLI's start is timed too: ``ditq --help`` and an argument error (median of 5).

    python bench/bench_compile.py --before 384afa1                    # reference model (1 and 4 groups), DiT-S/2
    python bench/bench_compile.py --before 384afa1 --models ref S XL  # and DiT-XL/2 (slow: minutes per compile)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

REFERENCE = ROOT / "models" / "dit-digits"
# What the heartbeat names, mapped to the rows of the table: both builds call the same steps by these names.
ROWS = [
    ("loading the checkpoint", "loading the checkpoint"),
    ("tracing", "tracing"),
    ("calibrating", "calibration"),
    ("exporting to ONNX", "export to ONNX"),
    ("lowering for the cpu target", "lowering"),
    ("writing the artifact", "writing the artifact"),
    ("checking ONNX Runtime's fusion", "ONNX Runtime fusion check"),
    ("checking ONNX Runtime's numerics against the torch graph", "numeric check (ONNX Runtime vs torch)"),
]
OTHER = "other (imports done on first use, the other passes, argument checks, the manifest)"


def child(argv: list[str], report: str) -> None:
    """In the child: run the CLI's compile with a thread that files every 20 ms under the current phase."""
    from ditq_compiler import progress
    from ditq_compiler.cli import main

    seconds: dict[str, float] = {}
    stop = threading.Event()

    def sample() -> None:
        last = time.perf_counter()
        while not stop.wait(0.02):
            now = time.perf_counter()
            name = progress._ACTIVITY.name or "compiling"
            seconds[name] = seconds.get(name, 0.0) + now - last
            last = now

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    code = main(argv)
    stop.set()
    thread.join()
    Path(report).write_text(json.dumps({"code": code, "seconds": seconds, "main": time.perf_counter() - start}))


def run_compile(python_env: dict, checkpoint: Path, output: Path, options: list[str], work: Path) -> dict:
    report = work / f"{output.name}.json"
    argv = ["compile", str(checkpoint), "-o", str(output), *options]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", report.as_posix(), "--", *argv], env=python_env,
                          cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"compile failed: {' '.join(argv)}\n{done.stderr[-2000:]}")
    result = json.loads(report.read_text())
    rows = {label: 0.0 for _, label in ROWS} | {OTHER: 0.0}
    names = dict(ROWS)
    for name, value in result["seconds"].items():
        rows[names.get(name, OTHER)] += value
    rows["python start and imports"] = wall - result["main"]
    digest = hashlib.sha256((output / "model.onnx").read_bytes()).hexdigest()
    return {"rows": rows, "wall": wall, "sha256": digest}


def cli_start(python_env: dict, argv: list[str], cwd: Path) -> float:
    """Median wall time of ``python -m ditq_compiler.cli ARGV``, run in ``cwd`` (not the repository: ``-m`` puts
    the working directory first on the path, which would import the working tree for either build)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ditq_compiler.cli", *argv], env=python_env, cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if "error:" not in done.stderr and argv != ["--help"]:
            raise SystemExit(f"expected an argument error from {argv}, got: {done.stderr[-500:]}")
    return statistics.median(times)


def before_build(revision: str, work: Path) -> tuple[dict, str]:
    """A checkout of ``revision`` importable as ``ditq_compiler`` (its passes/ and exporters/ linked in, as the
    package installs them), and the environment that puts it first on the path."""
    tree = work / "before"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision], check=True,
                       stdout=subprocess.DEVNULL)
        for name in ("passes", "exporters"):
            (tree / "ditq_compiler" / name).symlink_to(Path("..") / name)
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    return {**os.environ, "PYTHONPATH": str(tree)}, commit


def cases(models: list[str], work: Path) -> list[tuple[str, Path, list[str]]]:
    from bench_speed import random_dit

    found = []
    if "ref" in models:
        found.append(("reference model (models/dit-digits), W8A8 minmax, 1 group", REFERENCE,
                      ["--format", "w8a8", "--recipe", "minmax"]))
        found.append(("reference model, W8A8 minmax, 4 timestep groups", REFERENCE,
                      ["--format", "w8a8", "--recipe", "minmax", "--groups", "4"]))
    for size in ("S", "B", "XL"):
        if size in models:
            checkpoint = work / f"dit-{size}"
            if not checkpoint.exists():
                random_dit(size).save_pretrained(checkpoint, safe_serialization=True)
            found.append((f"DiT-{size}/2 (random weights), W8A8 minmax, 2 samples x 10 calibration steps", checkpoint,
                          ["--format", "w8a8", "--recipe", "minmax", "--calib-samples", "2", "--calib-steps", "10"]))
    return found


def goal_lines(results: list[tuple[str, dict]], argument_error: float) -> list[str]:
    """The issue's goals, each against this run's "after" figures."""
    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    after = {title: measured["after"]["wall"] for title, measured in results}
    lines = ["### Against the goals (after)", ""]
    one = next((wall for title, wall in after.items() if title.startswith("reference model (")), None)
    four = next((wall for title, wall in after.items() if "4 timestep groups" in title), None)
    xl = next((wall for title, wall in after.items() if title.startswith("DiT-XL/2")), None)
    if one is not None:
        lines.append(f"- Reference model, 1 group, at most 20 s: {one:.1f} s, {met(one <= 20)}.")
    if one is not None and four is not None:
        lines.append(f"- Reference model, 4 groups, at most 1.3x one group: {four / one:.2f}x, {met(four <= 1.3 * one)}.")
    if xl is not None:
        lines.append(f"- DiT-XL/2 on the CPU in at most 10 minutes: {xl / 60:.1f} minutes, {met(xl <= 600)}.")
    lines.append(f"- An argument error in under 2 s: {argument_error:.2f} s, {met(argument_error < 2)}.")
    return lines + [""]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[4:], sys.argv[2])
        return
    from common import machine_description, write_marked_block

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git revision of the 'before' build")
    parser.add_argument("--models", nargs="+", default=["ref", "S"], choices=["ref", "S", "B", "XL"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ditq-bench-compile"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    before_env, before_commit = before_build(args.before, args.work)
    after_env = dict(os.environ)
    after_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
    lines = ["## Compile time by phase, before and after issue 23's changes", "",
             f"Written by `python bench/bench_compile.py --before {args.before} --models {' '.join(args.models)}` on "
             f"{datetime.date.today()}; {machine_description()}. Before: revision {before_commit}; after: "
             f"{after_commit} with the working tree. Each compile is a child process of `ditq compile` run alone; "
             "its phases are sampled every 20 ms by the names both builds give them; \"python start and imports\" "
             "is the process's time before the CLI's main runs.", ""]
    results = []
    for title, checkpoint, options in cases(args.models, args.work):
        measured = {}
        for build, env in (("before", before_env), ("after", after_env)):
            print(f"{title}: {build}", file=sys.stderr, flush=True)
            measured[build] = run_compile(env, checkpoint, args.work / f"{build}-{len(results)}", options, args.work)
        results.append((title, measured))
        before, after = measured["before"], measured["after"]
        lines += [f"### {title}", "", "| phase | before s | after s |", "|---|---:|---:|"]
        for label in [label for _, label in ROWS] + [OTHER, "python start and imports"]:
            lines.append(f"| {label} | {before['rows'][label]:.1f} | {after['rows'][label]:.1f} |")
        lines.append(f"| **total (wall clock of the process)** | **{before['wall']:.1f}** | **{after['wall']:.1f}** |")
        same = "identical" if before["sha256"] == after["sha256"] else "different"
        lines += ["", f"model.onnx of the two builds: {same} bytes.", ""]
    help_before, help_after = cli_start(before_env, ["--help"], args.work), cli_start(after_env, ["--help"], args.work)
    error_before = cli_start(before_env, ["compile", "--format", "w8a8"], args.work)
    error_after = cli_start(after_env, ["compile", "--format", "w8a8"], args.work)
    lines += ["### The CLI's start (median of 5 processes)", "", "| command | before s | after s |", "|---|---:|---:|",
              f"| `ditq --help` | {help_before:.2f} | {help_after:.2f} |",
              f"| `ditq compile --format w8a8` (an argument error) | {error_before:.2f} | {error_after:.2f} |", ""]
    lines += goal_lines(results, error_after)
    write_marked_block(args.out, "compile-phases", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
