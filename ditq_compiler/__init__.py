"""ditq: compile Diffusion Transformer checkpoints into quantized ONNX artifacts."""

__version__ = "0.1.0"

from . import quant_ops as _quant_ops  # noqa: E402,F401  (registers the ditq:: torch ops)
from .artifact import Artifact  # noqa: E402
from .config import CalibrationConfig, CompileConfig, LayerRule  # noqa: E402
from .errors import DitqError  # noqa: E402
from .ort_transformer import OrtTransformer  # noqa: E402
from .pipeline import compile, run_pipeline  # noqa: E402

__all__ = ["Artifact", "CalibrationConfig", "CompileConfig", "DitqError", "LayerRule", "OrtTransformer", "compile", "run_pipeline",
           "__version__"]
