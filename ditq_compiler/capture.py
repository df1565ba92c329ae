"""Capture the real input tensors of quantized layers on a few recorded calibration inputs.

Calibration keeps only per-channel ranges (bounded memory on any model). Choices that need the values
themselves — an FP4 grid and clipping range (HQ-DiT), a layer's sensitivity, GPTQ's Hessian — run the
branch's graph on the calibration inputs recorded for its timestep group and capture what each quantized
input tensor holds there, flattened to ``[rows, channels]``. The graph is run as it is at that point of
the pipeline (folds included), and left as it was.
"""

from __future__ import annotations

import torch
from torch import fx

from .qspec import SPEC_KEY


class _Recorder(torch.nn.Module):
    def __init__(self, store: dict, key: str, max_rows: int):
        super().__init__()
        self.store, self.key, self.max_rows = store, key, max_rows

    def forward(self, x):
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        kept = self.store.setdefault(self.key, [])
        if sum(r.shape[0] for r in kept) < self.max_rows:
            kept.append(rows[: self.max_rows])
        return x


def capture_layer_inputs(gm: fx.GraphModule, inputs: list[tuple[torch.Tensor, ...]], *,
                         keys: set[str] | None = None, max_rows: int = 4096) -> dict[str, torch.Tensor]:
    """input key -> ``[rows, channels]`` of that tensor on ``inputs`` (up to ``max_rows`` rows)."""
    producers: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(SPEC_KEY)
        if spec is not None and (keys is None or spec.input_key in keys):
            producers.setdefault(spec.input_key, node.args[0])
    store: dict[str, list[torch.Tensor]] = {}
    added = []
    for index, (key, source) in enumerate(producers.items()):
        name = f"ditq_capture_{index}"
        gm.add_submodule(name, _Recorder(store, key, max_rows))
        with gm.graph.inserting_after(source):
            recorder = gm.graph.call_module(name, (source,))
        source.replace_all_uses_with(recorder, delete_user_cb=lambda user, r=recorder: user is not r)
        added.append((source, recorder, name))
    gm.recompile()
    try:
        with torch.no_grad():
            for batch in inputs:
                gm(*batch)
    finally:
        for source, recorder, name in added:
            recorder.replace_all_uses_with(source)
            gm.graph.erase_node(recorder)
            gm.delete_submodule(name)
        gm.recompile()
    return {key: torch.cat(parts)[:max_rows] for key, parts in store.items()}
