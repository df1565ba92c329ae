"""How one tensor is quantized (:class:`QuantizerSpec`): plain data, without torch, so that the command line
(its formats and their help) starts without importing torch. ``qspec.py`` holds the decisions written on graphs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Integer grids: (qmin, qmax) and the torch dtype that stores them (the zero point's dtype, as in ONNX).
_INTEGER_DTYPES = {
    "int8": (-128, 127, "int8"),
    "uint8": (0, 255, "uint8"),
    "int4": (-8, 7, "int8"),  # held in int8 in torch; packed to 4 bits by the exporter
    "int32": (-(2**31), 2**31 - 1, "int32"),
}


@dataclass(frozen=True)
class QuantizerSpec:
    """How one tensor is quantized.

    ``granularity``: ``tensor`` (one scale), ``channel`` (one per output channel) or ``block`` (one per
    ``block_size`` inputs of each output channel; for an activation, one per ``block_size`` inputs of each
    token). ``qmin``/``qmax`` may be narrower than the dtype (``reduce_range``: 7-bit weights that cannot
    saturate the u8 x s8 kernels of CPUs without VNNI). ``dynamic``: an activation whose scale (and zero
    point) the kernel computes at run time from the tensor itself; nothing is calibrated for it
    (``quantizers.dynamic_fake_quantize`` gives the numerics).
    """

    dtype: str  # int8 | uint8 | int4 | int32 | float8e4m3fn | fp4
    granularity: str
    symmetric: bool
    qmin: float
    qmax: float
    block_size: int | None = None
    # fp4: the 4-bit grids a layer may choose from (ditq_compiler/grids.py), in order of preference
    grids: tuple[str, ...] = ()
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.dtype in _INTEGER_DTYPES:
            lo, hi, _ = _INTEGER_DTYPES[self.dtype]
            if not lo <= self.qmin < self.qmax <= hi:
                raise ValueError(f"range [{self.qmin}, {self.qmax}] does not fit {self.dtype}")
        elif self.dtype not in ("float8e4m3fn", "fp4"):
            raise ValueError(f"unknown quantized dtype {self.dtype}")
        if (self.granularity == "block") != (self.block_size is not None):
            raise ValueError("block_size is given exactly for block granularity")
        if (self.dtype == "fp4") != bool(self.grids):
            raise ValueError("grids are given exactly for fp4")
        if self.dynamic and (self.dtype, self.granularity, self.symmetric) not in (
                ("uint8", "tensor", False), ("int8", "block", True)):
            raise ValueError("dynamic quantizers are uint8 affine per tensor (DynamicQuantizeMatMul) or int8 "
                             "symmetric per block of each token (MatMulNBits, accuracy level 4)")

    @classmethod
    def dynamic_activation(cls, block_size: int | None = None) -> "QuantizerSpec":
        """A run-time activation quantizer: uint8 affine over the whole tensor (ONNX ``DynamicQuantizeLinear``,
        what ``DynamicQuantizeMatMul`` does), or with ``block_size`` int8 symmetric per ``block_size`` inputs
        of each token (what ``MatMulNBits`` does at accuracy level 4)."""
        if block_size is None:
            return cls("uint8", "tensor", False, 0, 255, dynamic=True)
        return cls("int8", "block", True, -127, 127, block_size, dynamic=True)

    @classmethod
    def float8(cls, granularity: str) -> "QuantizerSpec":
        return cls("float8e4m3fn", granularity, True, -448.0, 448.0)

    @classmethod
    def fp4(cls, granularity: str, grids: tuple[str, ...] = ("e2m1", "e3m0", "int4")) -> "QuantizerSpec":
        """4-bit with a per-layer (weights) or per-tensor-and-group (activations) choice of grid."""
        return cls("fp4", granularity, True, -1.0, 1.0, grids=tuple(grids))

    @classmethod
    def integer(cls, dtype: str, granularity: str, symmetric: bool, *, bits: int | None = None,
                block_size: int | None = None) -> "QuantizerSpec":
        lo, hi, _ = _INTEGER_DTYPES[dtype]
        if bits is not None:  # a narrower range inside the dtype
            if lo < 0:
                lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            else:
                hi = 2**bits - 1
        if symmetric and lo < 0:
            lo = -hi  # symmetric signed grids drop the lone most negative value
        return cls(dtype, granularity, symmetric, lo, hi, block_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the quantized values are stored in (and the zero point's): int4 and fp4 weights are
        held in int8 (fp4 as ``g * multiplier``); fp4 activations in uint8 (``g * multiplier + 128``)."""
        import torch

        if self.dtype == "float8e4m3fn":
            return torch.float8_e4m3fn
        if self.dtype == "fp4":
            return torch.int8 if self.granularity != "tensor" else torch.uint8
        return getattr(torch, _INTEGER_DTYPES[self.dtype][2])

    @property
    def is_integer(self) -> bool:
        return self.dtype in _INTEGER_DTYPES

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin

    def describe(self) -> str:
        extra = f", block {self.block_size}" if self.block_size else ""
        if self.grids:
            extra += f", grid from {'/'.join(self.grids)}"
        full = _INTEGER_DTYPES.get(self.dtype)
        narrowed = "" if full is None or (self.qmin, self.qmax) in ((full[0], full[1]), (-full[1], full[1])) else \
            f" [{self.qmin}, {self.qmax}]"
        return (f"{self.dtype}{narrowed} per {self.granularity}{extra}, {'symmetric' if self.symmetric else 'affine'}"
                + (", dynamic" if self.dynamic else ""))
