"""Does this CPU's u8 x s8 int8 GEMM saturate?

ONNX Runtime's x86 int8 GEMMs multiply uint8 activations by int8 weights. Without VNNI (AVX2, and AVX-512
without VNNI) the kernel uses ``vpmaddubsw``, which adds two u8 x s8 products into an int16 and saturates:
``255 * 127 * 2 = 64770 > 32767``. With AVX-512 VNNI, AVX-VNNI or AMX the products accumulate in int32
(``vpdpbusd``/``tdpbusd``) and nothing saturates. Measured on an AVX2 CPU: full-range int8 weights give
5-20% output error; weights in [-64, 63] (``--weight-range reduced``) are exact and as fast; ONNX Runtime's
session option ``session.x64quantprecision=1`` converts int8 weights to uint8 at load, exact but ~30%
slower (U8U8 kernels).

The check that decides is a probe: ONNX Runtime itself multiplies the worst case through the kernel this
machine would use. It costs a few milliseconds and is cached.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """True when ONNX Runtime's CPU u8 x s8 GEMM saturates on this machine (probed)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from .runtime import quiet_session_options

    k = 64  # pairs of 255 * 127: exact sum 64 * 255 * 127, saturated far below it
    weight = numpy_helper.from_array(np.full((k, 8), 127, dtype=np.int8), "w")
    nodes = [helper.make_node("MatMulInteger", ["a", "w"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("a", TensorProto.UINT8, [16, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [16, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    options = quiet_session_options()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    result = session.run(None, {"a": np.full((16, k), 255, dtype=np.uint8)})[0]
    return bool((result != k * 255 * 127).any())


def saturation_safe_options(options, weight_range: str) -> bool:
    """Make ``options`` exact for an artifact with ``weight_range`` on this CPU; True when it had to switch
    ONNX Runtime to its slower non-saturating U8U8 kernels (full-range weights on a CPU without VNNI)."""
    if weight_range == "full" and u8s8_saturates():
        options.add_session_config_entry("session.x64quantprecision", "1")
        return True
    return False
