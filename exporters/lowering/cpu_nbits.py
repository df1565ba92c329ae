"""CPU lowering of block-wise int4 weights and dynamic activations: the kernels ONNX Runtime runs them on.

``BlockWeightsToMatMulNBits`` (``--weight-block B``). The canonical form of a block-wise int4 layer is
``MatMul(A, DequantizeLinear(W_q [K, N] int8, s [ceil(K/B), N], 0, axis=0, block_size=B))``. It becomes::

    y = com.microsoft.MatMulNBits(A, Bq, scales, bias, K=K, N=N, bits=4, block_size=B, accuracy_level=L)

Algebra: MatMulNBits computes ``y[n] = sum_k A[k] (Bq[n, k] - 8) scales[n, k // B] + bias[n]``; storing
``Bq[n, k] = W_q[k, n] + 8`` (``cuda.pack_nbits``, two values a byte, padding of a partial last block holds 8,
i.e. zero) and ``scales[n * blocks + j] = s[j, n]`` gives exactly ``A W_dq + bias``. The accuracy level is
written on the node, never left to ONNX Runtime's session default (which is 4 for the DequantizeLinear +
MatMul fusion it would otherwise do, measured: that quantizes the input again and breaks static W4A8):

* static activations, ``L = 1`` (float32 compute): ``A`` is the activation's ``DequantizeLinear`` output, so
  the kernel computes the calibrated W4A8 product in float;
* ``--act dynamic``, ``L = 4``: ``A`` is the float input itself (the ``ai.ditq.DynamicQuantizeBlock`` marker
  the exporter wrote is removed): MLAS quantizes each block of ``B`` inputs of each token to int8,
  ``s = max|a| / 127``, and runs int8 dot products (``quantizers.dynamic_fake_quantize`` is the same
  arithmetic; measured to float rounding of the GEMM).

``DynamicInputsToDynamicQuantizeMatMul`` (``--act dynamic``, per-channel weights). The canonical form is
``MatMul(DequantizeLinear(DynamicQuantizeLinear(x)), DequantizeLinear(W [K, N], s_w [N], z_w, axis=1))``
(+ ``Add(bias)``); it becomes ``com.microsoft.DynamicQuantizeMatMul(x, W, s_w, z_w, bias)``, which quantizes
``x`` exactly as ``DynamicQuantizeLinear`` does (uint8 over the whole tensor) and sums the integer products
in int32. ``W`` may be an int4 weight that ``PackInt4Weights`` then stores in 4 bits behind a Cast (folded at
load).

Both run before the other CPU passes and decline, with the reason, what does not match. Their registered
inverses undo nothing: an artifact in which they rewrote a layer is refused by ``ditq lower`` with one line
(block-wise and dynamic layers are CPU-only, see ``config.py``), one in which they rewrote none raises as before.

Measured (2-core x86 CPU, AVX2 without VNNI, ONNX Runtime 1.31, 512 tokens x 768 -> 3072): MatMulNBits at
block 32, 64 and 128, accuracy level 1 or 4, was 1.2-3x slower than per-channel int4 behind ``Cast`` on
``MatMulIntegerToFloat`` in every run (noisy, shared machine); ``DynamicQuantizeMatMul`` about as fast as
``MatMulIntegerToFloat``
(``bench/bench_formats.py``, ``docs/benchmarks.md``). So per-channel weights stay the default.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from ...errors import ArtifactError
from . import LoweringPass, all_nodes, inverse_of
from .cpu_kernels import GELU_OPS, PER_COLUMN_WEIGHT, per_column_weight, producer
from .shared import PASS_KEY, add_initializer, constant_array, mark_origin

MS_DOMAIN = "com.microsoft"
DITQ_DOMAIN = "ai.ditq"
STATIC_ACCURACY_LEVEL = 1  # float32 compute of the dequantized input
DYNAMIC_ACCURACY_LEVEL = 4  # int8 compute, the input quantized per block at run time


def _weight_layers(layers: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, record in layers.items():
        found.setdefault(record.weight, []).append(key)
    return found


def _bias_add(matmul: ir.Node, n: int) -> tuple[ir.Node | None, ir.Value | None]:
    """The single ``Add`` of a constant float ``[N]`` bias after ``matmul``, if there is one."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "Add" or \
            (uses[0].node.domain or "") not in ("", "ai.onnx"):
        return None, None
    add = uses[0].node
    bias = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    array = constant_array(bias)
    if array is None or array.dtype != np.float32 or array.shape != (n,):
        return None, None
    return add, bias


def _replace(old_last: ir.Node, kernel: ir.Node, remove: list[ir.Node]) -> None:
    """``kernel`` takes the place (and output name) of ``old_last``'s output; ``remove`` are dropped, and
    producers left without readers after them."""
    graph = old_last.graph
    graph.insert_before(old_last, kernel)
    old = old_last.outputs[0]
    new = kernel.outputs[0]
    new.dtype, new.shape = old.dtype or ir.DataType.FLOAT, old.shape
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = f"{name}.unlowered"
    new.name = name
    graph.remove(remove, safe=True)


def _drop_unread(nodes: list[ir.Node | None]) -> None:
    for node in nodes:
        if node is not None and node.graph is not None and \
                not any(v.uses() or v.is_graph_output() for v in node.outputs):
            node.graph.remove(node, safe=True)


class BlockWeightsToMatMulNBits(LoweringPass):
    name = "block_weights_to_matmul_nbits"

    def lower(self, model):
        from .cuda import pack_nbits

        by_weight = _weight_layers(self.layers)
        packed_b: dict[int, ir.Value] = {}
        packed_scales: dict[int, ir.Value] = {}
        done, declined = Counter(), []
        replaced: dict[int, ir.Value] = {}
        for node in list(all_nodes(model.graph)):
            if node.op_type != "MatMul" or (node.domain or "") not in ("", "ai.onnx"):
                continue
            dq = producer(node.inputs[1], "DequantizeLinear")
            if dq is None or dq.attributes.get_int("block_size", 0) <= 0:
                continue
            weight, scale = dq.inputs[0], dq.inputs[1]
            keys = by_weight.get(weight.name.split("__group")[0], [])
            record = self.layers[keys[0]] if keys else None
            if record is None or "-block" not in record.weight_format:
                declined.append(f"{weight.name}: no recorded block-wise layer reads it")
                continue
            array, scales = constant_array(weight), constant_array(scale)
            block = dq.attributes["block_size"].as_int()
            axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
            zero = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
            reason = None
            if array is None or array.dtype != np.int8 or array.ndim != 2 or array.min() < -8 or array.max() > 7:
                reason = "weight is not int4 data [K, N] held in int8"
            elif scales is None or axis != 0 or scales.shape != (-(-array.shape[0] // block), array.shape[1]):
                reason = "scales are not [ceil(K / block), N] along axis 0"
            elif zero is not None and np.any(zero != 0):
                reason = "non-zero weight zero points"
            elif block < 16 or block & (block - 1):
                reason = f"block size {block} is not a power of two >= 16 (MatMulNBits)"
            if reason:
                declined.append(f"{keys[0]}: {reason}")
                continue
            x = node.inputs[0]
            marker = None
            level = STATIC_ACCURACY_LEVEL
            if record.activation == "dynamic":
                marker = producer(x, "DynamicQuantizeBlock", DITQ_DOMAIN)
                if marker is None or marker.attributes["block_size"].as_int() != block:
                    declined.append(f"{keys[0]}: dynamic input without its block marker of size {block}")
                    continue
                x, level = marker.inputs[0], DYNAMIC_ACCURACY_LEVEL
            k, n = array.shape
            if id(weight) not in packed_b:
                base, _, group = weight.name.partition("__group")
                packed_b[id(weight)] = add_initializer(model, f"{base}.nbits" + (f"__group{group}" if group else ""),
                                                       pack_nbits(array, 4, block))
            if id(scale) not in packed_scales:
                base, _, group = scale.name.partition("__group")
                packed_scales[id(scale)] = add_initializer(
                    model, f"{base}.nbits" + (f"__group{group}" if group else ""),
                    np.ascontiguousarray(scales.astype(np.float32).T).reshape(-1))
            add, bias = _bias_add(node, n)
            inputs = [x, packed_b[id(weight)], packed_scales[id(scale)]]
            if bias is not None:
                inputs += [None, None, bias]
            kernel = mark_origin(ir.node("MatMulNBits", inputs, {"K": k, "N": n, "bits": 4, "block_size": block,
                                                                 "accuracy_level": level},
                                         domain=MS_DOMAIN, name=f"{node.name}.nbits"), self.name, keys[0])
            last = add if add is not None else node
            _replace(last, kernel, [add, node] if add is not None else [node])
            replaced.update({id(v): v for v in (weight, scale, *dq.inputs[2:]) if v is not None})
            _drop_unread([dq, marker])
            for key in keys:
                self.layers[key].weight = packed_b[id(weight)].name.split("__group")[0]
            done[f"accuracy level {level}"] += 1
        for value in [*replaced.values()]:  # the int8 weights and [blocks, N] scales the packed copies replace
            if not value.uses() and value.name in model.graph.initializers:
                model.graph.initializers.pop(value.name)
        if done:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        _drop_marker_domain(model)
        summary = (f"rewrote {sum(done.values())} block-wise int4 layers as MatMulNBits "
                   f"({', '.join(f'{c} at {lvl}' for lvl, c in sorted(done.items())) or 'none'}; "
                   f"{len(packed_b)} packed weights)")
        if declined:
            summary += f"; declined {len(declined)} ({declined[0]})"
        return bool(done), summary


class DynamicInputsToDynamicQuantizeMatMul(LoweringPass):
    name = "dynamic_inputs_to_dynamic_quantize_matmul"

    def lower(self, model):
        by_weight = _weight_layers(self.layers)
        done, declined = Counter(), []
        for node in list(all_nodes(model.graph)):
            if node.op_type != "MatMul" or (node.domain or "") not in ("", "ai.onnx"):
                continue
            a_dq = producer(node.inputs[0], "DequantizeLinear")
            dynamic = producer(a_dq.inputs[0], "DynamicQuantizeLinear") if a_dq is not None else None
            w_dq = producer(node.inputs[1], "DequantizeLinear")
            if dynamic is None or w_dq is None:
                continue
            weight = w_dq.inputs[0]
            keys = by_weight.get(weight.name.split("__group")[0], [])
            if not keys or self.layers[keys[0]].activation != "dynamic":
                declined.append(f"{weight.name}: no recorded dynamic layer reads it")
                continue
            array = per_column_weight(w_dq)
            if array is None:
                declined.append(f"{keys[0]}: {PER_COLUMN_WEIGHT}")
                continue
            zero = w_dq.inputs[2] if len(w_dq.inputs) > 2 else None
            add, bias = _bias_add(node, array.shape[1])
            if add is not None and any(u.node.op_type in GELU_OPS for u in add.outputs[0].uses()):
                add, bias = None, None  # ONNX Runtime fuses that bias into FastGelu(x, bias)
            inputs = [dynamic.inputs[0], weight, w_dq.inputs[1], zero] + ([bias] if bias is not None else [])
            kernel = mark_origin(ir.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN,
                                         name=f"{node.name}.dynamic"), self.name, keys[0])
            last = add if add is not None else node
            _replace(last, kernel, [add, node] if add is not None else [node])
            _drop_unread([w_dq, a_dq, dynamic])
            done["with bias" if bias is not None else "without bias"] += 1
        if done:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        summary = (f"rewrote {sum(done.values())} dynamic-input layers as DynamicQuantizeMatMul "
                   f"({', '.join(f'{c} {what}' for what, c in sorted(done.items())) or 'none'})")
        if declined:
            summary += f"; declined {len(declined)} ({declined[0]})"
        return bool(done), summary


def _drop_marker_domain(model: ir.Model) -> None:
    """Markers of the exporter's own domain must all be gone: ONNX Runtime has no such op."""
    left = [node.name for node in all_nodes(model.graph) if node.domain == DITQ_DOMAIN]
    if left:
        raise ValueError(f"{len(left)} {DITQ_DOMAIN} marker nodes were not lowered (e.g. {left[0]})")
    model.opset_imports.pop(DITQ_DOMAIN, None)


class _RefuseIfLowered(LoweringPass):
    """Inverse of a CPU-only lowering: nothing to undo when the pass rewrote no layer, else one clear refusal."""

    forward = ""

    def lower(self, model):
        made = [node for node in all_nodes(model.graph) if node.metadata_props.get(PASS_KEY) == self.forward]
        if made:
            raise ArtifactError(f"{len(made)} layers run as {made[0].op_type} ({self.forward}: --weight-block or "
                                "--act dynamic), which ditq lower cannot take back; compile the checkpoint again "
                                "with the options you want")
        return False, f"nothing to raise: {self.forward} rewrote no layer"


@inverse_of(BlockWeightsToMatMulNBits.name)
class RaiseBlockWeights(_RefuseIfLowered):
    name = "raise_block_weights"
    forward = BlockWeightsToMatMulNBits.name


@inverse_of(DynamicInputsToDynamicQuantizeMatMul.name)
class RaiseDynamicInputs(_RefuseIfLowered):
    name = "raise_dynamic_inputs"
    forward = DynamicInputsToDynamicQuantizeMatMul.name
