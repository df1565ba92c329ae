"""The fault suite's tally, for the README's table (``python tools/fault_table.py`` writes it).

When ``$DITQ_FAULT_LOG`` names a file, every fault test appends one JSON line per fault it tried:
its kind, whether ditq answered with one clear error line and exit code 2 where an error was due, and
whether an artifact that existed before was lost or damaged. Without the variable nothing is written,
so an ordinary test run leaves no file behind.
"""

from __future__ import annotations

import json
import os

LOG_ENV = "DITQ_FAULT_LOG"


def record(kind: str, case: str, *, clear_error: bool | None, artifact_lost: bool | None, **details) -> None:
    """``clear_error``: None where no error was due (a kill); ``artifact_lost``: None where none existed."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = {"kind": kind, "case": case, "clear_error": clear_error, "artifact_lost": artifact_lost, **details}
    with open(path, "a") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")
