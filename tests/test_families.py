"""The model family adapter: what a family declares, that the compiler asks it, and that no module outside
``ditq_compiler/families`` knows a family's inputs or modules."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG, make_tiny_dit
from pixart_fixtures import make_tiny_pixart
from ditq_compiler.errors import TimestepError
from ditq_compiler.families import DIT, FAMILIES, ROLES, Signature, family_for

ROOT = Path(__file__).resolve().parents[1]
# Names that belong to DiT (its forward's keywords, its config keys, its module names). Outside the family
# package they may appear only in docstrings, and in the CLI's user-facing text and its --class-labels option.
DIT_WORDS = ("class_labels", "num_embeds_ada_norm", "DiTTransformer2DModel", "transformer_blocks", "hidden_states",
             "sample_size", "norm1", "attn1", "proj_out_1")
ALLOWED = {"ditq_compiler/cli.py"}  # `ditq run --class-labels` and help texts with DiT module examples


def _docstring_ids(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def test_no_module_outside_the_family_package_names_dit_inputs_or_modules():
    hits: dict[str, list] = {}
    for package in ("ditq_compiler", "passes", "exporters"):
        for file in sorted((ROOT / package).rglob("*.py")):
            if "families" in file.parts:
                continue
            tree = ast.parse(file.read_text())
            docstrings = _docstring_ids(tree)
            for node in ast.walk(tree):
                text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings else \
                    node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
                    node.arg if isinstance(node, ast.arg) else None
                if text and any(word in text for word in DIT_WORDS):
                    hits.setdefault(str(file.relative_to(ROOT)), []).append((node.lineno, text[:60]))
    outside = {file: lines for file, lines in hits.items() if file not in ALLOWED}
    assert outside == {}, f"family knowledge outside ditq_compiler/families: {outside}"


def test_dit_signature_roles_order_and_dtypes():
    signature = DIT.signature(TINY_CONFIG)
    assert signature.names == ("sample", "timestep", "class_labels")
    assert [spec.role for spec in signature.inputs] == ["latent", "timestep", "class"]
    assert [spec.kwarg for spec in signature.inputs] == ["hidden_states", "timestep", "class_labels"]
    assert all(spec.role in ROLES and spec.shape[0] == "batch" for spec in signature.inputs)
    assert signature.index("timestep") == 1 and signature.timestep_name == "timestep"
    with pytest.raises(KeyError, match="no text input"):
        signature.index("text")
    inputs = DIT.example_inputs(TINY_CONFIG, batch=3, seed=1)
    feeds = signature.feeds(inputs)
    assert [feeds[name].dtype for name in signature.names] == [np.float32, np.int64, np.int64]
    assert list(signature.kwargs(inputs)) == ["hidden_states", "timestep", "class_labels"]
    manifest = signature.to_manifest()
    assert Signature.from_manifest(manifest["inputs"], manifest["outputs"]) == signature


def test_dit_timestep_domain_is_the_schedulers_discrete_range():
    domain = DIT.timestep_domain({"num_train_timesteps": 1000})
    assert (domain.kind, domain.dtype, domain.low, domain.high) == ("discrete", "int64", 0, 999)
    domain.check(torch.tensor([0, 500, 999]))
    for bad in (1000, -1):
        with pytest.raises(TimestepError, match=rf"timestep {bad} is outside the scheduler's range \[0, 999\]"):
            domain.check(torch.tensor([5, bad]))


def test_trace_takes_the_signature_order_and_keeps_the_function():
    from ditq_compiler.tracing import trace_model

    model = make_tiny_dit()
    inputs = DIT.example_inputs(TINY_CONFIG, batch=3, seed=2)
    gm = trace_model(model, DIT, TINY_CONFIG, inputs)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["sample", "timestep", "class_labels"]
    with torch.no_grad():
        expected = model(**DIT.signature(TINY_CONFIG).kwargs(inputs)).sample
        assert torch.equal(gm(*inputs), expected)


def test_roles_blocks_and_registry():
    assert DIT.role_of("transformer_blocks.3.attn1.to_k") == "qkv"
    assert DIT.role_of("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1") == "embedder"
    assert DIT.quantized_by_default("transformer_blocks.1.ff.net.2")
    assert not DIT.quantized_by_default("proj_out_2") and DIT.quantized_by_default("proj_out_2", with_optional=True)
    assert DIT.block_of("transformer_blocks.12.ff.net.0.proj") == "transformer_blocks.12"
    assert DIT.block_of("proj_out_1") is None
    assert family_for("DiTTransformer2DModel") is DIT
    assert set(FAMILIES) == {"DiTTransformer2DModel", "PixArtTransformer2DModel"}
    with pytest.raises(KeyError, match="no model family takes UNet2DModel"):
        family_for("UNet2DModel")


def test_dit_calibration_conditions_and_class_checks():
    from ditq_compiler.errors import ConfigError

    conditions = DIT.calibration_conditions(TINY_CONFIG, samples=6, seed=0)
    assert len(conditions) == 6 and all(0 <= c < TINY_CONFIG["num_embeds_ada_norm"] for c in conditions)
    with pytest.raises(ConfigError, match="class label 99 is outside"):
        next(DIT.iterate_sampling(lambda *x: x[0], {"num_train_timesteps": 1000}, TINY_CONFIG, [99], steps=2,
                                  guidance_scale=1.0, seed=0))


@pytest.mark.slow
def test_manifest_records_the_signature_and_timestep_domain(compiled_tiny):
    artifact = compiled_tiny[0]
    inputs = artifact.manifest["inputs"]
    assert list(inputs) == ["sample", "timestep", "class_labels"]
    assert [inputs[name]["role"] for name in inputs] == ["latent", "timestep", "class"]
    assert artifact.manifest["timestep_domain"] == {"kind": "discrete", "dtype": "int64", "low": 0, "high": 999}
    assert artifact.signature == DIT.signature(artifact.model_config)


def test_pixart_traces_and_exports_to_an_onnx_model_onnx_runtime_runs():
    """The adapter generalises past DiT: four inputs (latent, text, timestep, padding mask), the no-op squeeze
    dropped before export, and ONNX Runtime (float) agrees with the diffusers model to 1e-5 relative."""
    import onnx
    import onnxruntime as ort

    from ditq_compiler.exporters import export_onnx
    from ditq_compiler.families.pixart import PIXART
    from ditq_compiler.tracing import trace_model

    model = make_tiny_pixart()
    config = dict(model.config)
    signature = PIXART.signature(config)
    inputs = PIXART.example_inputs(config, batch=2, seed=0)
    gm = trace_model(model, PIXART, config, inputs)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == list(signature.names)
    assert not [n for n in gm.graph.nodes if "squeeze.dim" in str(n.target) and "unsqueeze" not in str(n.target)]
    assert PIXART.block_of("transformer_blocks.1.attn2.to_k") == "transformer_blocks.1"
    assert PIXART.role_of("transformer_blocks.1.attn2.to_k") == "cross_kv"

    check = PIXART.example_inputs(config, batch=3, seed=4)  # another batch size, padded rows
    assert int(check[3].sum()) < check[3].numel()
    with torch.no_grad():
        expected = model(**signature.kwargs(check), return_dict=False)[0].numpy()
        assert np.abs(gm(*check).numpy() - expected).max() <= 1e-6 * np.abs(expected).max()
    proto = export_onnx(gm, signature, inputs)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == list(signature.names)
    # the only Squeeze left is the exporter's own (a dim size taken out of a Shape), not the forward's squeeze(1)
    assert all(node.name.startswith("node_sym_size") for node in proto.graph.node if node.op_type == "Squeeze")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run([signature.output], signature.feeds(check))[0]
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def test_without_the_squeeze_clean_up_onnx_runtime_rejects_pixart():
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from ditq_compiler.exporters import export_onnx
    from ditq_compiler.families.pixart import PIXART, PixArtFamily
    from ditq_compiler.tracing import trace_model

    class WithoutCleanUps(PixArtFamily):
        def export_cleanups(self):
            return ()

    model = make_tiny_pixart()
    config = dict(model.config)
    inputs = PIXART.example_inputs(config)
    proto = export_onnx(trace_model(model, WithoutCleanUps(), config, inputs), PIXART.signature(config), inputs)
    with pytest.raises(Fail, match="Squeeze"):
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_pixart_alpha_1024_signature_takes_resolution_and_aspect_ratio():
    """``use_additional_conditions`` (diffusers: on at sample size 128 unless the config says otherwise) adds the
    ``added_cond_kwargs`` entries as inputs of role ``size``, nested back as the forward takes them."""
    from ditq_compiler.families.pixart import PIXART

    base = dict(make_tiny_pixart().config)
    assert PIXART.signature(base).names == ("sample", "encoder_hidden_states", "timestep", "encoder_attention_mask")
    for config in (dict(base, use_additional_conditions=True), dict(base, use_additional_conditions=None,
                                                                    sample_size=128)):
        signature = PIXART.signature(config)
        assert signature.names[-2:] == ("resolution", "aspect_ratio") and signature.spec("size").name == "resolution"
        inputs = PIXART.example_inputs(config, batch=2)
        kwargs = signature.kwargs(inputs)
        assert set(kwargs["added_cond_kwargs"]) == {"resolution", "aspect_ratio"}
        assert kwargs["added_cond_kwargs"]["aspect_ratio"].shape == (2, 1)
        assert signature.spec("size").value_in(kwargs) is inputs[4]
        PIXART.build_model(config, "tiny")  # no longer refused
    assert not PIXART.takes_sizes(dict(base, use_additional_conditions=False, sample_size=128))