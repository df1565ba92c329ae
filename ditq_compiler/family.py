"""Model-family knowledge in one place: which linears a family has, what job each does, which are
quantized by default.

Passes never match DiT module names themselves; they ask the family adapter for a layer's *role*
(``qkv``, ``attn_out``, ``fc1``, ``fc2``, ``adaln``, ``embedder``, ``final``). Recipes select layers by
role (PTQ4DiT balances qkv, attn_out and fc1), folding rules match graph structure, and annotation takes
the default quantized set from here. PixArt (adaLN-single) and SD3 (joint attention) add adapters.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # role -> module-name globs
    roles: dict[str, tuple[str, ...]]
    # roles quantized unless a layer rule says otherwise
    default_quantized_roles: tuple[str, ...]
    # roles that stay in float by default and are quantized with ``--quantize-embedders`` (the embedders' and the
    # final layer's linears: small, run once per call, and near the output)
    optional_quantized_roles: tuple[str, ...] = ()

    def role_of(self, module: str) -> str:
        for role, patterns in self.roles.items():
            if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
                return role
        return "other"

    def quantized_by_default(self, module: str, with_optional: bool = False) -> bool:
        role = self.role_of(module)
        return role in self.default_quantized_roles or (with_optional and role in self.optional_quantized_roles)

    @property
    def default_patterns(self) -> tuple[str, ...]:
        return tuple(p for role in self.default_quantized_roles for p in self.roles[role])


DIT = ModelFamily(
    name="DiT (adaLN-zero)",
    roles={
        "qkv": ("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k",
                "transformer_blocks.*.attn1.to_v"),
        "attn_out": ("transformer_blocks.*.attn1.to_out.0",),
        "fc1": ("transformer_blocks.*.ff.net.0.proj",),
        "fc2": ("transformer_blocks.*.ff.net.2",),
        "adaln": ("transformer_blocks.*.norm1.linear",),
        "embedder": ("transformer_blocks.*.norm1.emb.*", "pos_embed.*"),
        "final": ("proj_out_1", "proj_out_2"),
    },
    default_quantized_roles=("qkv", "attn_out", "fc1", "fc2", "adaln"),
    optional_quantized_roles=("embedder", "final"),
)

FAMILIES = {"DiTTransformer2DModel": DIT}


def family_for(model_class: str) -> ModelFamily:
    return FAMILIES.get(model_class, DIT)
