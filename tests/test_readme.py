"""The README's commands are executable: CI runs its test command, and its main job runs here."""

import re
import shlex
from pathlib import Path

import numpy as np

from ditq_compiler.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readmes_test_command():
    test_command = next(block.strip() for block in _bash_blocks() if "pytest" in block)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_main_job_runs_on_the_bundled_model(tmp_path, capsys, monkeypatch):
    main_job = next(block.strip() for block in _bash_blocks() if "ditq compile" in block)
    ditq_commands = [part.strip() for part in main_job.split("&&") if part.strip().startswith("ditq ")]
    assert [c.split()[1] for c in ditq_commands] == ["compile", "run"]
    monkeypatch.chdir(ROOT)  # the README runs from the repository root
    for command in ditq_commands:
        argv = [arg.replace("out/", f"{tmp_path}/") for arg in shlex.split(command)[1:]]
        assert main(argv) == 0, capsys.readouterr().err
    samples = np.load(tmp_path / "samples.npz")["samples"]
    assert samples.shape == (10, 1, 16, 16) and np.isfinite(samples).all()
    assert (tmp_path / "samples.png").is_file()
