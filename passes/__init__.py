"""ditq's graph passes (installed as ``ditq_compiler.passes``)."""

from .annotate import AnnotateLinearQuantization
from .calibrate import CollectActivationStats
from .grouping import GroupTimesteps
from .insert_qdq import InsertQuantDequant
from .minmax import ChooseMinMaxParams

__all__ = ["AnnotateLinearQuantization", "CollectActivationStats", "GroupTimesteps", "ChooseMinMaxParams",
           "InsertQuantDequant"]
