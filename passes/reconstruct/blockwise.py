"""The walk every method shares: the model block by block, on every timestep group's calibration rows.

For each timestep group ``g`` the calibration rows are its recorded denoiser inputs
(``ctx.check_inputs_by_group(per_group=None)``), shuffled once with ``--seed`` and cut into chunks. Two streams
run through the segments (``segments.py``): the float model, whose block outputs are the targets, and the model
quantized so far (earlier blocks with their reconstructed parameters), whose block outputs feed the next
block, as in BRECQ and GPTQ. Values between segments live in a :class:`ValueStore` on disk.

Which parameters exist, and which groups share them, is decided once here (:class:`QuantizerRegistry`) and
carried as data: a weight is one :class:`WeightQuantizer` for every group whose branch holds that weight object
(``pooled``: learned on all those groups' rows, materialized as one tensor object, stored once) or one per
group (``per-group``: each group's weight learned on its own rows). Activation quantizers belong to a branch;
what a method learns of them is its :class:`MethodSpec`. A weight that layers of several blocks read, or that
something other than a quantized linear reads, keeps nearest rounding (the reason is reported).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ...grouped import get_tensor
from ...memory import release_freed_memory
from ...qspec import PARAMS_KEY, SPEC_KEY
from .cache import PeakMemory, ValueStore
from .fakequant import ActivationQuantizer, FakeQuantLinear, WeightQuantizer, make_trainable
from .segments import Segment, SegmentUnsupported, batch_symbol, extract, is_batched, partition

CHUNK_ROWS = 4  # calibration rows (whole images) per chunk: one training minibatch


@dataclass(frozen=True)
class MethodSpec:
    """What a reconstruction method learns, as data.

    ``activation_scales``: ``fixed``; ``shared`` (one learned factor per tensor applied to every group's
    calibrated scale: BRECQ and LSQ know no timestep groups); ``per-group`` (each group's own scale, trained on
    that group's rows: DilateQuant's temporal parallel quantizer)."""

    name: str
    paper: str
    learn_rounding: bool = False
    learn_weight_scale: bool = False
    activation_scales: str = "fixed"
    learn_zero_points: bool = False
    blockwise_training: bool = False  # trained against block outputs (else: GPTQ, layer by layer)


@dataclass
class Problem:
    """One training unit of a block: the groups whose rows it sees, and their trainable segment modules."""

    groups: list[int]
    modules: dict[int, torch.nn.Module]  # group -> the block's trainable (fake-quant) module


@dataclass
class BlockReport:
    name: str
    layers: int
    nearest_error: float  # relative L2 of the block outputs vs the float block, nearest rounding
    error: float  # the same with the reconstructed parameters
    iterations: int = 0
    stopped_by_budget: bool = False
    seconds: float = 0.0
    layer_errors: list[tuple[str, float, float]] = field(default_factory=list)  # gptq: (layer, nearest, gptq)
    notes: list[str] = field(default_factory=list)
    # resident memory (bytes) when the walk reached this block, and its peak while the block's two streams ran
    # and it trained: flat over the blocks when one block's working set is what the pass holds
    start_bytes: int = 0
    peak_bytes: int = 0


@dataclass
class WeightPlan:
    """What is known of one weight quantizer before it exists: the weight, its parameters, where it is read
    (branch, tensor target, node) and whether it may be learned (else why not)."""

    weight: torch.Tensor
    params: object  # LinearQuantParams of its first reader
    spec: object  # LinearQuantSpec of its first reader
    segment: str
    sites: list = field(default_factory=list)
    frozen_reason: str | None = None


class QuantizerRegistry:
    """The quantizers of every branch, created when a segment first needs them and released (as compact
    :class:`LearnedWeight` / activation parameters) when its block is done, so only one block's training state
    is ever in memory."""

    def __init__(self, module, method: MethodSpec, weights_per_group: bool, segments_by_branch: list[list[Segment]]):
        self.branches = module.graph_modules()
        self.method, self.per_group = method, weights_per_group
        self.segment_of: list[dict[str, str]] = [
            {node: segment.name for segment in segments for node in segment.nodes} for segments in segments_by_branch]
        self.plans: dict[tuple, WeightPlan] = {}
        self.weights: dict[tuple, WeightQuantizer] = {}
        self.activations: dict[tuple[int, str], ActivationQuantizer] = {}
        self.activation_segments: dict[tuple[int, str], set[str]] = {}
        self.shared_log_scales: dict[object, torch.nn.Parameter] = {}
        self.learned_weights: list = []  # LearnedWeight, in the order blocks finished
        self.learned_activations: dict[tuple[int, str], object] = {}  # (branch, input key) -> ActivationParams
        self._plan_weights()
        self._plan_activations()

    @property
    def frozen_reasons(self) -> dict[str, str]:
        """layer -> why its weight keeps nearest rounding."""
        return {plan.spec.layer: plan.frozen_reason for plan in self.plans.values() if plan.frozen_reason}

    # weights ------------------------------------------------------------------------------------
    def weight_key(self, branch: int, weight: torch.Tensor) -> tuple:
        return (id(weight), branch) if self.per_group else (id(weight),)

    def _plan_weights(self) -> None:
        readers: dict[int, list[tuple[int, torch.fx.Node]]] = {}  # id(weight) -> every (branch, reading node)
        for index, gm in enumerate(self.branches):
            for node in gm.graph.nodes:
                if node.op == "get_attr":
                    tensor = get_tensor(gm, node.target)
                    readers.setdefault(id(tensor), []).extend((index, user) for user in node.users)
        for index, gm in enumerate(self.branches):
            for node in gm.graph.nodes:
                spec, params = node.meta.get(SPEC_KEY), node.meta.get(PARAMS_KEY)
                if spec is None or params is None:
                    continue
                weight = get_tensor(gm, node.args[1].target)
                key = self.weight_key(index, weight)
                if key not in self.plans:
                    scope = [(b, n) for b, n in readers.get(id(weight), []) if not self.per_group or b == index]
                    self.plans[key] = WeightPlan(weight, params, spec, self.segment_of[index].get(node.name, ""),
                                                 frozen_reason=self._cannot_learn(readers.get(id(weight), []), scope,
                                                                                  spec))
                self.plans[key].sites.append((index, node.args[1].target, node))

    def _cannot_learn(self, readers, scope, spec) -> str | None:
        """Why a weight must keep nearest rounding, or None. ``readers``: every node reading it in any branch;
        ``scope``: those whose groups would share the learned weight."""
        if not (spec.weight.is_integer or spec.weight.dtype == "fp4"):
            return f"{spec.weight.dtype} weights have no rounding grid to learn"
        if spec.weight.granularity != "channel":
            return f"weights quantized per {spec.weight.granularity} (reconstruction learns per-channel grids)"
        if any(SPEC_KEY not in n.meta or PARAMS_KEY not in n.meta for _, n in readers):
            return "its weight is also read by something other than a quantized linear"
        if len({self.segment_of[b].get(n.name) for b, n in readers}) > 1:
            return "its weight is shared by layers of several blocks"
        first = scope[0][1].meta[PARAMS_KEY]
        for _, node in scope[1:]:
            params = node.meta[PARAMS_KEY]
            if params.weight_grid != first.weight_grid or not torch.equal(params.weight_scale, first.weight_scale):
                return "the groups sharing its weight quantize it with different scales"
        return None

    def weight_for(self, branch: int, node) -> WeightQuantizer:
        key = self.weight_key(branch, get_tensor(self.branches[branch], node.args[1].target))
        if key not in self.weights:
            plan = self.plans[key]
            learn = plan.frozen_reason is None
            quantizer = WeightQuantizer(plan.weight, plan.params.weight_scale, plan.spec.weight,
                                        plan.params.weight_grid, learn_rounding=learn and self.method.learn_rounding,
                                        learn_scale=learn and self.method.learn_weight_scale)
            quantizer.trainable = learn
            self.weights[key] = quantizer
        return self.weights[key]

    # activations ----------------------------------------------------------------------------------
    def _plan_activations(self) -> None:
        for index, gm in enumerate(self.branches):
            for node in gm.graph.nodes:
                spec, params = node.meta.get(SPEC_KEY), node.meta.get(PARAMS_KEY)
                if spec is not None and params is not None and params.activation is not None:
                    self.activation_segments.setdefault((index, spec.input_key), set()).add(
                        self.segment_of[index].get(node.name))

    def activation_for(self, branch: int, node) -> ActivationQuantizer | None:
        spec, params = node.meta[SPEC_KEY], node.meta[PARAMS_KEY]
        if spec.activation is not None and getattr(spec.activation, "dynamic", False):
            return ActivationQuantizer(None, spec.activation)  # computed at run time: its exact numerics, fixed
        if params.activation is None:
            return None
        key = (branch, spec.input_key)
        if key not in self.activations:
            mode = self.method.activation_scales
            learnable = spec.activation.is_integer or spec.activation.dtype == "fp4"  # FP8: no grid to learn on
            learn = mode != "fixed" and learnable and len(self.activation_segments[key]) == 1  # in one block only
            log_scale = None
            if learn:
                share = spec.input_key if mode == "shared" and not self.per_group else key
                log_scale = self.shared_log_scales.setdefault(share, torch.nn.Parameter(torch.zeros(())))
            self.activations[key] = ActivationQuantizer(params.activation, spec.activation, log_scale,
                                                        learn and self.method.learn_zero_points)
        return self.activations[key]

    def linear_for(self, branch: int):
        def build(node) -> FakeQuantLinear:
            spec = node.meta[SPEC_KEY]
            bias_node = node.args[2] if len(node.args) > 2 else None
            bias = get_tensor(self.branches[branch], bias_node.target) if bias_node is not None else None
            return FakeQuantLinear(spec.layer, self.weight_for(branch, node), self.activation_for(branch, node), bias,
                                   spec.bias == "int32")
        return build

    # release ----------------------------------------------------------------------------------------
    def finish(self, segment: str, note: str) -> None:
        """Keep what the quantizers of ``segment`` learned, compactly, and free them."""
        from .materialize import learned_weight

        for key in [k for k, plan in self.plans.items() if plan.segment == segment and k in self.weights]:
            learned = learned_weight(self.weights.pop(key), self.plans[key].sites, note)
            if learned is not None:
                self.learned_weights.append(learned)
        for key in [k for k, segments in self.activation_segments.items() if segments == {segment}]:
            quantizer = self.activations.pop(key, None)
            if quantizer is not None and quantizer.changed:
                self.learned_activations[key] = quantizer.materialized()


class BlockwiseRun:
    """Segments of every branch, the two streams on disk, and the quantizers."""

    def __init__(self, module, ctx, method: MethodSpec, *, weights_per_group: bool, seed: int,
                 chunk_rows: int = CHUNK_ROWS):
        self.module, self.ctx, self.method = module, ctx, method
        self.branches = module.graph_modules()
        self.segments = [partition(gm, ctx.family) for gm in self.branches]
        names = [[s.name for s in segments] for segments in self.segments]
        if any(n != names[0] for n in names[1:]):
            raise SegmentUnsupported("timestep-group branches are cut into different blocks")
        self.registry = QuantizerRegistry(module, method, weights_per_group, self.segments)
        self.weights_per_group = weights_per_group
        self.store = ValueStore()
        self.generator = torch.Generator().manual_seed(seed)
        self.chunks: dict[int, int] = {}
        self.trainable: dict[tuple[int, str], torch.fx.GraphModule] = {}
        self._write_inputs(chunk_rows)

    def close(self) -> None:
        self.store.close()

    # streams ----------------------------------------------------------------------------------------
    def _write_inputs(self, chunk_rows: int) -> None:
        """Each group's calibration rows, shuffled with the seed, as the graph inputs of the fp stream."""
        inputs = self.ctx.check_inputs_by_group(per_group=None)
        placeholders = [n.name for n in self.branches[0].graph.nodes if n.op == "placeholder"]
        for branch in self.ctx.branches:
            batches = inputs.get(branch.index, [])
            if not batches:
                self.chunks[branch.index] = 0
                continue
            columns = [torch.cat([batch[i] for batch in batches]) for i in range(len(placeholders))]
            order = torch.randperm(columns[0].shape[0], generator=self.generator)
            pieces = order.split(chunk_rows)
            self.chunks[branch.index] = len(pieces)
            for chunk, rows in enumerate(pieces):
                for name, column in zip(placeholders, columns):
                    self.store.write("fp", branch.index, name, chunk, column[rows])
                    self.store.alias(branch.index, name)

    def read_inputs(self, stream: str, group: int, segment: Segment, chunk: int) -> list[torch.Tensor]:
        return [self.store.read(stream, group, name, chunk) for name in segment.inputs]

    def read_targets(self, group: int, segment: Segment, chunk: int) -> list[torch.Tensor]:
        return [self.store.read("fp", group, name, chunk) for name in segment.outputs]

    def float_module(self, group: int, index: int) -> torch.fx.GraphModule:
        return extract(self.branches[group], self.segments[group][index])

    def quantized_module(self, group: int, index: int) -> torch.fx.GraphModule:
        """The segment's fake-quant form (built once; its quantizers are the registry's)."""
        key = (group, self.segments[group][index].name)
        if key not in self.trainable:
            self.trainable[key] = make_trainable(self.float_module(group, index), self.registry.linear_for(group))
        return self.trainable[key]

    def _batched_outputs(self, group: int, segment: Segment) -> dict[str, bool]:
        gm = self.branches[group]
        by_name = {n.name: n for n in gm.graph.nodes}
        batch = batch_symbol(gm)
        return {name: is_batched(by_name[name], batch) for name in segment.outputs}

    def _write_outputs(self, stream: str, group: int, segment: Segment, chunk: int, outputs) -> None:
        for (name, batched), value in zip(self._batched_outputs(group, segment).items(), outputs):
            if not isinstance(value, torch.Tensor):
                raise SegmentUnsupported(f"{segment.name} passes on {name}, which is not a tensor")
            if batched or chunk == 0:
                self.store.write(stream, group, name, chunk, value, batched=batched)

    def run_float(self, index: int) -> None:
        """The fp stream through segment ``index`` (its outputs are the next inputs and this block's targets)."""
        for group, count in self.chunks.items():
            segment = self.segments[group][index]
            module = self.float_module(group, index)
            with torch.no_grad():
                for chunk in range(count):
                    outputs = module(*self.read_inputs("fp", group, segment, chunk))
                    self._write_outputs("fp", group, segment, chunk, outputs)

    def run_quantized(self, index: int) -> None:
        """The q stream through segment ``index`` with its quantizers as they are now (hard rounding). A
        segment with nothing quantized whose inputs are the float ones passes the float values on."""
        from .fakequant import set_mode

        for group, count in self.chunks.items():
            segment = self.segments[group][index]
            inputs_float = all(self.store.is_alias(group, name) for name in segment.inputs)
            if not segment.layers and inputs_float:
                for name in segment.outputs:
                    self.store.alias(group, name)
                continue
            module = self.quantized_module(group, index)
            set_mode(module.modules(), "hard")
            with torch.no_grad():
                for chunk in range(count):
                    outputs = module(*self.read_inputs("q", group, segment, chunk))
                    self._write_outputs("q", group, segment, chunk, outputs)

    def drop_unused(self, index: int) -> None:
        """Remove the stored values no segment after ``index`` reads."""
        later = {name for segment in self.segments[0][index + 1:] for name in segment.inputs}
        for segment in self.segments[0][: index + 1]:
            for name in segment.outputs + segment.inputs:
                if name not in later:
                    self.store.drop(name)

    def block_error(self, index: int, mode: str) -> float:
        """Relative L2 error of segment ``index``'s outputs (q inputs, weights in ``mode``) vs the fp targets,
        over every group's rows."""
        from .fakequant import relative_squared_error, set_mode

        error = norm = 0.0
        for group, count in self.chunks.items():
            segment = self.segments[group][index]
            module = self.quantized_module(group, index)
            set_mode(module.modules(), mode)
            with torch.no_grad():
                for chunk in range(count):
                    outputs = module(*self.read_inputs("q", group, segment, chunk))
                    e, n = relative_squared_error(outputs, self.read_targets(group, segment, chunk))
                    error, norm = error + float(e), norm + float(n)
        return (error / max(norm, 1e-30)) ** 0.5

    def problems(self, index: int) -> list[Problem]:
        """Training units of segment ``index``: one over every group (pooled weights) or one per group."""
        groups = [g for g, count in self.chunks.items() if count]
        modules = {g: self.quantized_module(g, index) for g in groups}
        if self.weights_per_group:
            return [Problem([g], {g: modules[g]}) for g in groups]
        return [Problem(groups, modules)]

    def release(self, index: int, note: str) -> None:
        """Segment ``index`` is done: keep what its quantizers learned (compactly) and free them."""
        name = self.segments[0][index].name
        self.registry.finish(name, note)
        for key in [k for k in self.trainable if k[1] == name]:
            del self.trainable[key]

    def walk(self, reconstruct_block, *, deadline: float | None, note: str) -> list[BlockReport]:
        """Run every segment: the fp stream, then ``reconstruct_block(run, index, block_deadline)`` for a block,
        then the q stream. Each block gets an equal share of the time left before ``deadline``."""
        reports = []
        segments = self.segments[0]
        blocks_left = sum(1 for s in segments if s.is_block)
        for index, segment in enumerate(segments):
            if segment.name == "tail":
                break
            with PeakMemory() as memory:
                self.run_float(index)
                if segment.is_block:
                    share = None if deadline is None else \
                        time.monotonic() + max(deadline - time.monotonic(), 0) / blocks_left
                    report = reconstruct_block(self, index, share)
                    blocks_left -= 1
                self.run_quantized(index)
                self.release(index, note)
                self.drop_unused(index)
                release_freed_memory()  # so the next block starts where this one did
            if segment.is_block:
                report.start_bytes, report.peak_bytes = memory.start, memory.peak
                reports.append(report)
        return reports
