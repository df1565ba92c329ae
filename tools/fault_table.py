"""Run the fault suite and write its tally into README.md, so the table's numbers come from a run.

    python tools/fault_table.py                 # runs the suite (about four minutes on 2 cores)
    python tools/fault_table.py --log FILE      # or tally an existing $DITQ_FAULT_LOG file

The suite (tests/test_faults.py, test_reliability.py, test_properties.py) appends one JSON line per fault
it tried to the file named by ``$DITQ_FAULT_LOG`` (see tests/faultlog.py). This script sums them per kind
of fault and replaces the table between the README's ``fault-table`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["tests/test_faults.py", "tests/test_reliability.py", "tests/test_properties.py"]
BEGIN, END = "<!-- fault-table:begin -->", "<!-- fault-table:end -->"


def run_suite(log: Path) -> None:
    """pytest over the fault suite with the log enabled; a failing suite leaves the README as it was."""
    env = {**os.environ, "DITQ_FAULT_LOG": str(log)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE], cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.exit(f"the fault suite failed (exit {done.returncode}); README.md not updated")


def tally(lines: list[dict]) -> "OrderedDict[str, dict]":
    rows: OrderedDict[str, dict] = OrderedDict()
    for line in lines:
        row = rows.setdefault(line["kind"], {"tried": 0, "errors_due": 0, "clear": 0, "artifacts": 0, "lost": 0})
        row["tried"] += 1
        if line["clear_error"] is not None:
            row["errors_due"] += 1
            row["clear"] += bool(line["clear_error"])
        if line["artifact_lost"] is not None:
            row["artifacts"] += 1
            row["lost"] += bool(line["artifact_lost"])
    return rows


def table(rows: "OrderedDict[str, dict]") -> str:
    out = ["| fault tried | times | one clear error line, exit 2 | artifacts lost (goal 0) |", "|---|---:|---:|---:|"]
    for kind, row in rows.items():
        clear = f"{row['clear']} of {row['errors_due']}" if row["errors_due"] else "n/a (killed, no error due)"
        lost = f"{row['lost']} of {row['artifacts']}" if row["artifacts"] else "n/a (none existed)"
        out.append(f"| {kind} | {row['tried']} | {clear} | {lost} |")
    return "\n".join(out)


def write_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        sys.exit(f"{readme} has no {BEGIN} ... {END} markers")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, help="tally this fault log instead of running the suite")
    args = parser.parse_args(argv)
    if args.log:
        log = args.log
    else:
        log = Path(tempfile.mkdtemp(prefix="ditq-faults-")) / "faults.jsonl"
        run_suite(log)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    text = table(tally(lines))
    write_readme(text)
    print(text)


if __name__ == "__main__":
    main()
