"""ditq: compile Diffusion Transformer checkpoints into quantized ONNX artifacts.

The public names are imported on first use (PEP 562), so ``ditq --help`` and an argument error answer without
importing torch or ONNX Runtime. Modules that build or run graphs with ditq's ``torch.ops.ditq`` ops import
``quant_ops`` themselves, which registers them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Artifact": ".artifact", "CalibrationConfig": ".config", "CompileConfig": ".config", "LayerRule": ".config",
    "DitqError": ".errors", "OrtTransformer": ".ort_transformer", "compile": ".pipeline", "run_pipeline": ".pipeline",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ditq_compiler' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
