import pytest

from ditq_compiler import CalibrationConfig, CompileConfig, LayerRule
from ditq_compiler.errors import ConfigError
from ditq_compiler.families import DIT

LAYERS = [
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
    "transformer_blocks.0.norm1.linear",
    "transformer_blocks.0.attn1.to_q",
    "transformer_blocks.0.ff.net.2",
    "transformer_blocks.1.attn1.to_q",
    "proj_out_1",
    "proj_out_2",
]


def test_default_set_is_block_linears_and_adaln_not_embedders_or_final_layer():
    decision = CompileConfig().select_layers(LAYERS, DIT)
    assert [name for name, q in decision.items() if q] == [
        "transformer_blocks.0.norm1.linear", "transformer_blocks.0.attn1.to_q",
        "transformer_blocks.0.ff.net.2", "transformer_blocks.1.attn1.to_q"]


def test_later_rules_win():
    config = CompileConfig().with_rules(LayerRule.parse("transformer_blocks.*=fp"),
                                        LayerRule.parse("transformer_blocks.1.*=int8"))
    decision = config.select_layers(LAYERS, DIT)
    assert not decision["transformer_blocks.0.attn1.to_q"]
    assert decision["transformer_blocks.1.attn1.to_q"]
    assert not decision["proj_out_1"]


def test_rule_can_quantize_a_default_fp_layer():
    decision = CompileConfig().with_rules(LayerRule("proj_out_*", True)).select_layers(LAYERS, DIT)
    assert decision["proj_out_1"] and decision["proj_out_2"]


def test_quantize_embedders_adds_the_embedders_and_the_final_layer_and_rules_still_win():
    config = CompileConfig(quantize_embedders=True)
    assert all(config.select_layers(LAYERS, DIT).values())
    decision = config.with_rules(LayerRule.parse("proj_out_2=fp")).select_layers(LAYERS, DIT)
    assert [name for name, q in decision.items() if not q] == ["proj_out_2"]
    assert config.to_manifest()["quantize_embedders"] is True


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="matches no linear layer"):
        CompileConfig().with_rules(LayerRule("blocks.*.attn", False)).select_layers(LAYERS, DIT)


@pytest.mark.parametrize("text", ["nopattern", "x=int3", "=fp"])
def test_bad_rule_text(text):
    with pytest.raises(ConfigError, match="PATTERN=int8|int4|fp8|fp4|fp"):
        LayerRule.parse(text)


def test_rules_choose_a_precision_per_layer():
    config = CompileConfig(format="w4a8").with_rules(LayerRule.parse("transformer_blocks.0.*=int8"),
                                                     LayerRule.parse("transformer_blocks.1.attn1.to_q=fp"))
    decision = config.select_layers(LAYERS, DIT)
    assert decision["transformer_blocks.0.attn1.to_q"] == "int8"
    assert decision["transformer_blocks.1.attn1.to_q"] is None and decision["proj_out_1"] is None


def test_unknown_format_and_recipe_and_unimplemented_format():
    with pytest.raises(ConfigError, match="unknown format 'w3a3'"):
        CompileConfig(format="w3a3").validate()
    with pytest.raises(ConfigError, match="unknown recipe 'magic'"):
        CompileConfig(recipe="magic").validate()
    for implemented in ("w8a8", "w4a8", "fp8", "fp4"):
        CompileConfig(format=implemented).validate()


def test_calibration_bounds():
    with pytest.raises(ConfigError, match="--calib-steps"):
        CompileConfig(calibration=CalibrationConfig(steps=0)).validate()
    with pytest.raises(ConfigError, match="--calib-samples"):
        CompileConfig(calibration=CalibrationConfig(samples=0)).validate()


def test_block_wise_weights_are_not_reconstructed():
    with pytest.raises(ConfigError, match="--reconstruct learns per-channel weight grids"):
        CompileConfig(format="w4a8", weight_block=64, reconstruct="gptq").validate()
