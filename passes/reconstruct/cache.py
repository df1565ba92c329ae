"""Bounded memory for reconstruction: values between blocks live on disk, and the pass measures its peak.

Reconstruction runs the model block by block on the calibration rows of every timestep group, twice: the
float model (its block outputs are the targets) and the model quantized so far (its block outputs are the next
block's inputs, as BRECQ and GPTQ take them). Only the values that cross a block boundary are kept, one file
per (stream, group, value, chunk of rows) in a temporary directory that is removed afterwards, so host memory
holds one block's working set, not the model's activations. A value the quantized stream computes exactly as
the float stream does (before the first quantized layer) is stored once.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch


class ValueStore:
    """``(stream, group, value name, chunk) -> tensor`` on disk. Streams: ``fp`` and ``q``."""

    def __init__(self, prefix: str = "ditq-reconstruct-"):
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.aliases: set[tuple[int, str]] = set()  # (group, name) whose q value is the fp value
        self.whole: set[tuple[str, int, str]] = set()  # values with no batch dimension: one file per group
        self.bytes_written = 0

    def _path(self, stream: str, group: int, name: str, chunk: int) -> Path:
        return self.root / stream / str(group) / name / f"{chunk}.pt"

    def write(self, stream: str, group: int, name: str, chunk: int, tensor: torch.Tensor, *, batched: bool = True):
        if not batched:
            self.whole.add((stream, group, name))
            chunk = 0
        path = self._path(stream, group, name, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        value = tensor.detach().contiguous()
        torch.save(value, path)
        self.bytes_written += value.numel() * value.element_size()
        if stream == "q":
            self.aliases.discard((group, name))

    def alias(self, group: int, name: str) -> None:
        """The q stream's value of ``name`` is the fp stream's."""
        self.aliases.add((group, name))

    def is_alias(self, group: int, name: str) -> bool:
        return (group, name) in self.aliases

    def read(self, stream: str, group: int, name: str, chunk: int) -> torch.Tensor:
        if stream == "q" and (group, name) in self.aliases:
            stream = "fp"
        if (stream, group, name) in self.whole:
            chunk = 0
        return torch.load(self._path(stream, group, name, chunk), weights_only=True)

    def drop(self, name: str) -> None:
        """Forget a value no later segment reads."""
        for stream_dir in self.root.iterdir():
            for group_dir in stream_dir.iterdir():
                shutil.rmtree(group_dir / name, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``); the lifetime peak elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Samples resident memory in a thread while the block runs: ``peak`` and ``start`` in bytes."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.start = self.peak = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ditq-reconstruct-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self):
        self.start = self.peak = resident_bytes()
        self._began = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
        self.seconds = time.perf_counter() - self._began
