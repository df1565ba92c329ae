"""A compiled artifact as a drop-in for ``pipe.transformer`` in the user's own diffusers pipeline.

    pipe = PixArtAlphaPipeline.from_pretrained(...)
    pipe.transformer = OrtTransformer.from_artifact("out/pixart-w8a8")
    image = pipe("a red fox in the snow").images[0]

The pipeline keeps doing what it does (text encoding, classifier-free guidance, the scheduler, VAE decoding) and
calls the artifact where it called the diffusers model: the same forward keywords (the family's signature maps
each ONNX input back to its diffusers keyword), the same output type (``Transformer2DModelOutput``, or a tuple with
``return_dict=False``) and the ``config`` the pipeline reads (``sample_size``, ``in_channels``, ``out_channels``).

:meth:`OrtTransformer.from_graph` wraps the torch fake-quant graph a compile produced in the same interface: the
artifact's reference, run through the same pipeline.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import ArtifactError
from .families import ModelFamily, Signature

# keywords a diffusers transformer takes that change nothing when left at their default
_NEUTRAL_KEYWORDS = ("added_cond_kwargs", "cross_attention_kwargs", "attention_mask", "attention_kwargs")


class OrtTransformer(torch.nn.Module):
    """``pipe.transformer`` backed by a ditq artifact (ONNX Runtime) or by a compile's torch graph."""

    def __init__(self, denoise: Callable[[tuple], torch.Tensor], family: ModelFamily, signature: Signature,
                 model_config: dict, fixed_sizes: dict[tuple[str, int], int] | None = None, description: str = ""):
        super().__init__()
        import diffusers
        from diffusers.configuration_utils import FrozenDict

        self._denoise = denoise
        self.family = family
        self.signature = signature
        self.config = FrozenDict(model_config)
        self.fixed_sizes = fixed_sizes or {}
        self.description = description
        diffusers_class = getattr(diffusers, family.model_classes[0])
        self._parameters_of_forward = inspect.signature(diffusers_class.forward)

    # the pipeline moves and casts its components and asks their device and dtype
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def from_artifact(cls, path: str | Path, provider: str = "auto") -> "OrtTransformer":
        """The artifact at ``path`` (verified against its sealed manifest) on ONNX Runtime's ``provider``."""
        from .artifact import Artifact

        artifact = Artifact.load(path)
        session = artifact.session(provider)
        fixed = {}
        for spec, value in zip(artifact.signature.inputs, session.get_inputs()):
            for dim, size in enumerate(value.shape):
                if isinstance(size, int) and dim > 0:
                    fixed[(spec.name, dim)] = size

        def denoise(inputs: tuple) -> torch.Tensor:
            return torch.from_numpy(np.asarray(artifact.denoise(*inputs, provider=provider)))

        return cls(denoise, artifact.family, artifact.signature, artifact.model_config, fixed, str(artifact.path))

    @classmethod
    def from_graph(cls, graph_module, family: ModelFamily, model_config: dict) -> "OrtTransformer":
        """A compile's torch graph (``CompileResult.graph_module``, the fake-quant reference) in the same interface."""
        def denoise(inputs: tuple) -> torch.Tensor:
            with torch.no_grad():
                return graph_module(*inputs)

        return cls(denoise, family, family.signature(model_config), model_config, description="torch graph")

    def forward(self, *args, return_dict: bool = True, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        bound = self._parameters_of_forward.bind_partial(self, *args, **kwargs).arguments
        bound.pop("self", None)
        bound.pop("return_dict", None)
        inputs = []
        for spec in self.signature.inputs:
            value = spec.value_in(bound)
            if value is None:
                raise ArtifactError(f"the pipeline did not pass {spec.kwarg}, which the compiled transformer takes")
            value = torch.as_tensor(value)
            for dim, size in enumerate(value.shape):
                want = self.fixed_sizes.get((spec.name, dim))
                if want is not None and int(size) != want:
                    hint = (f"; call the pipeline with max_sequence_length={want}" if spec.role in ("text", "mask")
                            else "")
                    raise ArtifactError(f"{spec.kwarg} has size {int(size)} in dim {dim}, the artifact was compiled "
                                        f"for {want}{hint}")
            inputs.append(value.detach().cpu())
        for keyword in self.signature.forward_keywords:  # taken whole, dict keywords included
            bound.pop(keyword, None)
        for name, value in bound.items():
            if value is None or (name in _NEUTRAL_KEYWORDS and isinstance(value, dict)
                                 and all(v is None for v in value.values())):
                continue
            raise ArtifactError(f"the compiled transformer does not take {name} (given by the pipeline); it was "
                                f"compiled for {', '.join(spec.kwarg for spec in self.signature.inputs)}")
        out = self._denoise(tuple(inputs)).to(torch.float32)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
