"""Identical subgraphs computed and stored once: op counts, structure and numerics of the pass on tiny DiTs, and
an artifact compiled from an original-DiT checkpoint (one embedder copied into every block) storing it once."""

import dataclasses
from collections import Counter

import onnx
import pytest
import torch

from conftest import make_tiny_dit
from ditq_compiler.passes.dedup import DeduplicateSubgraphs
from conftest import example_inputs, trace_dit
from ditq_compiler.tracing import linear_sites

BLOCKS = 4
EMBEDDER = "transformer_blocks.{}.norm1.emb"


def _shared_embedder_dit(**config):
    """A tiny DiT whose blocks hold equal embedders, as a converted original DiT checkpoint does."""
    model = make_tiny_dit(**{"num_layers": BLOCKS, **config})
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def _ops(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _deduplicated(model):
    gm = trace_dit(model, example_inputs(dict(model.config)))
    inputs = example_inputs(dict(model.config), batch=3, seed=5)
    with torch.no_grad():
        before = gm(*inputs)
    ops = _ops(gm)
    result = DeduplicateSubgraphs().run(gm, None)
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        after = gm(*inputs)
    return gm, result, ops, before, after


def test_blocks_sharing_one_embedder_compute_it_once():
    gm, result, before_ops, before, after = _deduplicated(_shared_embedder_dit())
    assert torch.equal(after, before)  # the same ops on the same inputs, bit for bit
    after_ops = _ops(gm)
    # blocks 1..3 lose their embedder (timestep MLP: 2 linears, class embedding) and their SiLU
    assert after_ops["aten.linear.default"] == before_ops["aten.linear.default"] - 2 * (BLOCKS - 1)
    assert after_ops["aten.embedding.default"] == before_ops["aten.embedding.default"] - (BLOCKS - 1)
    assert after_ops["aten.silu.default"] == before_ops["aten.silu.default"] - 2 * (BLOCKS - 1)
    assert result.modified and result.summary.startswith(
        "merged 3 identical subgraphs (transformer_blocks.{1..3}.norm1.{emb, silu} = "
        "transformer_blocks.0.norm1.{emb, silu}), 0.1 MB stored once")
    # structure: every block's adaLN linear reads block 0's SiLU(embedding)
    sites = {site.layer: site for site in linear_sites(gm)}
    adaln_inputs = {sites[f"transformer_blocks.{i}.norm1.linear"].input for i in range(BLOCKS)}
    assert len(adaln_inputs) == 1
    # block 0's embedder keeps both of its calls (block 0 and the final layer), each with its layer key
    first = EMBEDDER.format(0) + ".timestep_embedder.linear_1"
    assert first in sites and first + "#1" in sites
    assert not [key for key in sites if ".norm1.emb." in key and not key.startswith(EMBEDDER.format(0))]
    # and the duplicate tensors are gone from the graph's modules
    names = {name for name, _ in [*gm.named_parameters(), *gm.named_buffers()]}
    assert not [name for name in names if ".norm1.emb." in name and not name.startswith(EMBEDDER.format(0))]


def test_independent_embedders_share_only_the_timestep_projection():
    gm, result, before_ops, before, after = _deduplicated(make_tiny_dit())
    assert torch.equal(after, before)
    after_ops = _ops(gm)
    assert after_ops["aten.linear.default"] == before_ops["aten.linear.default"]
    assert after_ops["aten.sin.default"] == before_ops["aten.sin.default"] - 1  # block 1's sinusoids
    assert result.summary == ("merged 1 identical subgraph (transformer_blocks.1.norm1.emb.time_proj = "
                              "transformer_blocks.0.norm1.emb.time_proj), 0.0 MB stored once")


def test_equal_tensors_of_layers_that_differ_stay_their_own():
    """Equal zero biases under different weights merge no computation, so each layer keeps its tensor (folds
    that rewrite one layer's bias must not find it shared)."""
    model = make_tiny_dit()
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.norm1.linear.bias.zero_()
    gm, result, _, before, after = _deduplicated(model)
    assert torch.equal(after, before)
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {f"transformer_blocks.{i}.norm1.linear.bias" for i in range(2)} <= targets
    assert "0.0 MB stored once" in result.summary


@pytest.mark.slow
def test_artifact_of_an_original_dit_checkpoint_stores_the_embedder_once(tmp_path, fast_config):
    from test_loading import _original_state_dict

    from ditq_compiler.numerics import agreement
    from ditq_compiler.pipeline import compile_with_result

    model = _shared_embedder_dit(num_attention_heads=1, attention_head_dim=64)
    path = tmp_path / "DiT-tiny.pt"
    torch.save({"ema": _original_state_dict(model)}, path)
    # a width outside DiT's size table: the head count is given, never guessed
    artifact, result = compile_with_result(path, tmp_path / "art", dataclasses.replace(fast_config, num_heads=1))
    passes = artifact.manifest["passes"]
    assert passes[0]["name"] == "dedup_subgraphs" and passes[0]["summary"].startswith(
        "merged 3 identical subgraphs (transformer_blocks.{1..3}.norm1.{emb, silu}")
    onnx_model = onnx.load(artifact.model_path)
    initializers = {t.name for t in onnx_model.graph.initializer}
    embedder = {name for name in initializers if ".norm1.emb." in name}
    assert embedder and all(name.startswith(EMBEDDER.format(0)) for name in embedder)  # stored once
    ops = Counter(n.op_type for n in onnx_model.graph.node)
    assert ops["Sin"] == 2  # block 0's embedder and the final layer's call of it, instead of one per block + 1
    # one activation quantizer for SiLU(embedding), read by every block's adaLN linear; 4 more per block for the
    # linears' inputs (attention stays in float by default)
    assert ops["QuantizeLinear"] == 1 + 4 * BLOCKS
    assert artifact.manifest["fusion"]["fused_layers"] == len(result.quantized_layers) == 7 * BLOCKS
    x, t, y = example_inputs(dict(model.config), batch=2, seed=3)
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()}
    got = artifact.session("cpu").run(["out"], feeds)[0]
    with torch.no_grad():
        assert agreement(got, result.graph_module(x, t, y).numpy()).ok
        fp = model(x, timestep=t, class_labels=y).sample.numpy()
    assert agreement(got, fp).rel_l2 < 0.05  # W8A8 vs the float model it came from
