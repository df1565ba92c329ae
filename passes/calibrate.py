"""Calibration: run the FP graph along real sampling trajectories and record activation statistics.

Observers are inserted after every tensor that an annotated layer reads, each observer also reading the
graph's ``timestep`` input, so statistics are filed under the timestep of every row. The trajectories
are the model family's sampling loop on the checkpoint's own scheduler with ``calibration.steps`` sampling
steps, ``calibration.samples`` (noise, condition) pairs and classifier-free guidance as the family samples
(DiT: conditional and null-class halves in one batch), or, for a family calibrated through the user's diffusers
pipeline (PixArt), the transformer calls recorded from that pipeline (``ctx.recorded_calls``, see
``recording.py``), replayed through the graph. The observers are removed afterwards: the graph leaves this pass
as it came in.
"""

from __future__ import annotations

import torch

from ..calibration import ActivationObserver, ActivationStats, TensorStats
from ..errors import PassPreconditionError
from ..pass_manager import GraphPass, PassResult
from ..progress import track
from ..qspec import SPEC_KEY, attention_tensors

_OBSERVER_PREFIX = "ditq_observer_"


def annotated_inputs(gm) -> dict[str, list[str]]:
    """key -> the layers that read that tensor, for every annotated linear's input and every tensor of an
    annotated attention call (q, k, and v at the value projection's output)."""
    readers: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(SPEC_KEY)
        if spec is not None:
            readers.setdefault(spec.input_key, []).append(spec.layer)
    for key, (_, layer) in attention_tensors(gm).items():
        readers.setdefault(key, []).append(f"{layer} (attention)")
    return readers


def input_producers(gm) -> dict[str, torch.fx.Node]:
    """input key -> the node producing that tensor (the first argument of each of its readers).

    Readers that share an input key must read one node; a pass that made them read different nodes
    broke the contract, and this says which."""
    producers: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(SPEC_KEY)
        if spec is None:
            continue
        source = node.args[0]
        if producers.setdefault(spec.input_key, source) is not source:
            raise RuntimeError(f"readers of {spec.input_key} no longer read one tensor "
                               f"({producers[spec.input_key].name} vs {source.name} at {spec.layer})")
    return producers


def observed_tensors(gm) -> dict[str, torch.fx.Node]:
    """Every tensor calibration observes: the linears' inputs and the attention tensors."""
    return {**input_producers(gm), **{key: node for key, (node, _) in attention_tensors(gm).items()}}


def replay(denoise, calls):
    """Call ``denoise`` on each recorded ``(timestep, inputs)`` in order, yielding like a sampling loop."""
    for t, inputs in calls:
        denoise(*inputs)
        yield t, inputs, None


class CollectActivationStats(GraphPass):
    name = "calibrate"
    preserves_semantics = True

    def check_preconditions(self, gm, ctx):
        if not annotated_inputs(gm):
            raise PassPreconditionError(self.name, "no layer is annotated for quantization; run annotation first")

    def run(self, gm, ctx):
        readers = annotated_inputs(gm)
        producers = observed_tensors(gm)
        signature = ctx.signature
        timestep = next(node for node in gm.graph.nodes
                        if node.op == "placeholder" and node.target == signature.timestep_name)
        stats = ActivationStats()
        observers = []
        for index, (key, layers) in enumerate(readers.items()):
            stats.tensors[key] = TensorStats(key, layers)
            target = f"{_OBSERVER_PREFIX}{index}"
            gm.add_submodule(target, ActivationObserver(stats.tensors[key]))
            source = producers[key]
            with gm.graph.inserting_after(source):
                observer = gm.graph.call_module(target, (source, timestep))
            source.replace_all_uses_with(observer, delete_user_cb=lambda user: user is not observer)
            observers.append((source, observer, target))
        gm.recompile()

        calib = ctx.config.calibration
        family = ctx.family
        conditions = (None if ctx.recorded_calls is not None
                      else family.calibration_conditions(ctx.model_config, calib.samples, calib.seed))
        recorded = ctx.calibration_inputs
        timestep_at = signature.index("timestep")

        def denoise(*inputs):
            # Keep the first and last row (a conditional and an unconditional one) of each step: the
            # compile's final check compares ONNX Runtime with the torch graph on these.
            rows = sorted({0, inputs[0].shape[0] - 1})
            recorded[inputs[timestep_at][0].item()] = tuple(value[rows].clone() for value in inputs)
            return gm(*inputs)

        try:
            if ctx.recorded_calls is not None:  # the user's pipeline ran already: replay its transformer calls
                loop, total = replay(denoise, ctx.recorded_calls), len(ctx.recorded_calls)
            else:
                loop = family.iterate_sampling(denoise, ctx.scheduler_config, ctx.model_config, conditions,
                                               steps=calib.steps, guidance_scale=calib.guidance_scale,
                                               seed=calib.seed)
                total = calib.steps
            with torch.no_grad():
                for t, _, _ in track(loop, total=total, description="calibrating"):
                    stats.timesteps.append(t)
        finally:
            for source, observer, target in observers:
                observer.replace_all_uses_with(source)
                gm.graph.erase_node(observer)
                gm.delete_submodule(target)
            gm.recompile()

        ctx.stats = stats
        if ctx.recorded_calls is not None:
            source = f"{len(ctx.recorded_calls)} recorded transformer calls of the diffusers pipeline"
        else:
            source = f"{calib.samples} samples x {calib.steps} steps, guidance {calib.guidance_scale}"
        summary = (f"recorded per-channel ranges of {len(readers)} tensors at {len(set(stats.timesteps))} timesteps "
                   f"({source})")
        details = [f"{key}: read by {', '.join(layers)}" for key, layers in readers.items()]
        return PassResult(gm, modified=False, summary=summary, details=details)
