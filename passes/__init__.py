"""ditq's graph passes (installed as ``ditq_compiler.passes``)."""

from .annotate import AnnotateLinearQuantization
from .calibrate import CollectActivationStats
from .grouping import GroupTimesteps
from .insert_qdq import InsertQuantDequant
from .params import ChooseQuantParams
from .smoothing import FoldSmoothing
from .split import SplitTimestepGroups

__all__ = ["AnnotateLinearQuantization", "CollectActivationStats", "GroupTimesteps", "SplitTimestepGroups",
           "FoldSmoothing", "ChooseQuantParams", "InsertQuantDequant"]
