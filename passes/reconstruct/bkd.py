"""DilateQuant's block-wise knowledge distillation (BKD): the quantization parameters of each block trained
against the float block's output, with DilateQuant's *temporal parallel quantizer*: every timestep group's
branch has its own activation parameters, trained on that group's rows only, together with the weights.

What it learns, per block (``MethodSpec`` below; the loop and the loss are BRECQ's, ``adaround.py``):

* the weights' rounding (AdaRound's ``V``) and their per-channel step sizes ``s = s0 exp(u)``: one weight, and
  one set of step sizes, for every group that shares the weight object (``pooled``, stored once), or each
  group's own (``--reconstruct-weights per-group``);
* each group's activation step size ``s_g = s0_g exp(u_g)`` and zero point ``z_g = z0_g + round(dz_g)``
  (LSQ+, Bhalgat et al. 2020): a minibatch holds one group's rows, so only that group's quantizers move.

The differences to ``brecq`` are the per-group activation parameters (BRECQ learns one step-size factor per
tensor for every group), the zero points, and the weights' step sizes.
"""

from __future__ import annotations

from .blockwise import MethodSpec

BKD = MethodSpec(
    "bkd", "DilateQuant BKD: block-wise distillation of rounding, weight step sizes and per-group activation "
    "parameters (temporal parallel quantizer)",
    learn_rounding=True, learn_weight_scale=True, activation_scales="per-group", learn_zero_points=True,
    blockwise_training=True)
