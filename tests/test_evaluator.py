"""The quality benchmark's metrics (tools/evaluator.py) and its row registry and findings (bench/).

Every metric is checked against its formula computed the slow way on small arrays, with float64 tolerances.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from evaluator import (PCA, class_kernel_distance, frechet_distance, jackknife_std, kernel_distance,  # noqa: E402
                       kernel_distance_jackknife, psnr, psnr_jackknife)


def kid_by_definition(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3, written out as double sums."""
    d = a.shape[1]

    def k(x, y):
        return (x @ y / d + 1.0) ** 3

    m, n = len(a), len(b)
    within_a = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_b = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return within_a + within_b - 2 * cross


def test_kernel_distance_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(9, 3))
    assert kernel_distance(a, b) == pytest.approx(kid_by_definition(a, b), rel=1e-12, abs=1e-12)


def test_kernel_distance_is_zero_in_expectation_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    same = [kernel_distance(rng.normal(size=(40, 4)), rng.normal(size=(40, 4))) for _ in range(200)]
    shifted = [kernel_distance(rng.normal(0.5, 1, size=(40, 4)), rng.normal(size=(40, 4))) for _ in range(50)]
    # the mean of 200 draws is within 3 standard errors of 0; a shift of half a std is far above that
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    assert np.mean(shifted) > 10 * np.std(same) / np.sqrt(len(same))


def test_leave_one_out_values_match_recomputing_without_the_sample():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(8, 3)), rng.normal(size=(6, 3))
    value, left_out = kernel_distance_jackknife(a, b)
    assert value == pytest.approx(kernel_distance(a, b), rel=1e-12)
    for i in range(len(a)):
        assert left_out[i] == pytest.approx(kernel_distance(np.delete(a, i, 0), b), rel=1e-10, abs=1e-12)


def test_class_kernel_distance_is_the_mean_over_classes_with_matching_leave_one_out():
    rng = np.random.default_rng(3)
    a_classes, b_classes = np.arange(30) % 3, np.arange(24) % 3
    a, b = rng.normal(size=(30, 4)) + a_classes[:, None], rng.normal(size=(24, 4)) + b_classes[:, None]
    value, left_out = class_kernel_distance(a, a_classes, b, b_classes)
    per_class = [kernel_distance(a[a_classes == c], b[b_classes == c]) for c in range(3)]
    assert value == pytest.approx(np.mean(per_class), rel=1e-12)
    for i in (0, 1, 17):
        keep = np.arange(30) != i
        expected = class_kernel_distance(a[keep], a_classes[keep], b, b_classes)[0]
        assert left_out[i] == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_class_kernel_distance_has_no_bias_for_stratified_samples_where_plain_kid_has():
    """Samples drawn class by class in turn: plain KID between two sets of one model is negative on average,
    the per-class mean is not."""
    rng = np.random.default_rng(4)
    classes = np.arange(30) % 3
    centres = np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])

    def draw():
        return centres[classes] + rng.normal(size=(30, 3))

    plain = [kernel_distance(draw(), draw()) for _ in range(200)]
    per_class = [class_kernel_distance(draw(), classes, draw(), classes)[0] for _ in range(200)]
    assert np.mean(plain) < -5 * np.std(plain) / np.sqrt(200)
    assert abs(np.mean(per_class)) < 3 * np.std(per_class) / np.sqrt(200)


def test_jackknife_std_of_a_mean_is_the_standard_error():
    x = np.random.default_rng(5).normal(size=25)
    left_out = (x.sum() - x) / (len(x) - 1)
    assert jackknife_std(left_out) == pytest.approx(np.std(x, ddof=1) / np.sqrt(len(x)), rel=1e-12)


def test_psnr_jackknife_matches_psnr_and_leaving_a_sample_out():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(6, 1, 4, 4, generator=generator) * 2 - 1
    samples = reference + 0.1 * torch.randn(6, 1, 4, 4, generator=generator)
    value, left_out = psnr_jackknife(samples, reference)
    assert value == pytest.approx(psnr(samples, reference), abs=1e-5)
    keep = torch.arange(6) != 2
    assert left_out[2] == pytest.approx(psnr(samples[keep], reference[keep]), abs=1e-5)


def test_frechet_distance_in_one_dimension_and_of_a_set_with_itself():
    rng = np.random.default_rng(6)
    a, b = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(0.0, 1.0, size=(400, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    c = rng.normal(size=(200, 5))
    assert frechet_distance(c, c) == pytest.approx(0.0, abs=1e-6)


def test_pca_projects_on_orthonormal_top_components():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    pca = PCA.fit(x, 2)
    assert pca.components @ pca.components.T == pytest.approx(np.eye(2), abs=1e-12)
    projected = pca(x)
    assert projected.shape == (300, 2)
    assert projected.mean(0) == pytest.approx(np.zeros(2), abs=1e-9)
    assert np.abs(pca.components[0]).argmax() == 0 and np.abs(pca.components[1]).argmax() == 1


def test_row_registry_has_every_recipe_at_one_and_four_htg_groups_and_valid_configs():
    import quality_rows as qr

    from ditq_compiler import CompileConfig

    for recipe in qr.SMOOTHING_RECIPES:
        assert qr.DITQ_ROWS[qr.recipe_label(recipe)] == dict(format="w8a8", recipe=recipe)
        assert qr.DITQ_ROWS[qr.recipe_label(recipe, 4, "htg")] == dict(format="w8a8", recipe=recipe, groups=4,
                                                                       grouping="htg")
    assert qr.recipe_label("minmax", 4, "uniform") in qr.DITQ_ROWS
    w8a8 = [o for o in qr.DITQ_ROWS.values()
            if o["format"] == "w8a8" and not {"quantize_attention", "quantize_embedders"} & o.keys()]
    assert len(w8a8) == 2 * len(qr.SMOOTHING_RECIPES) + 1
    for fmt in qr.LOW_BIT_FORMATS:
        for recipe in qr.SMOOTHING_RECIPES:
            assert qr.DITQ_ROWS[qr.format_label(fmt, recipe)]["format"] == fmt
    for options in qr.DITQ_ROWS.values():
        CompileConfig(**options).validate()


def test_row_filter_takes_substrings_and_globs_and_keeps_fp32():
    import quality_rows as qr

    assert qr.select_rows(None) == list(qr.ALL_ROWS)
    assert qr.select_rows(["*W8A8 minmax"]) == [qr.FP32, qr.BASE]
    assert qr.select_rows(["MATMUL"]) == [qr.FP32, qr.QS_MATMUL]
    assert qr.select_rows(["W8A8 vidit"]) == [qr.FP32, "ditq W8A8 vidit", "ditq W8A8 vidit, 4 groups htg"]
    vidit = qr.select_rows(["vidit"])  # a substring: every format's vidit rows, in registry order
    assert vidit[:3] == qr.select_rows(["W8A8 vidit"]) and len(vidit) > 3
    assert all("vidit" in label for label in vidit[1:])
    with pytest.raises(SystemExit, match="matches no row"):
        qr.select_rows(["no such row"])


def _result(kid, kid_loo, psnr_value, psnr_loo):
    from bench_quality import RowResult

    return RowResult(kid=kid, kid_loo=np.asarray(kid_loo, float), accuracy=1.0, psnr=psnr_value,
                     psnr_loo=None if psnr_loo is None else np.asarray(psnr_loo, float), rel_l2=0.0,
                     fid_real=0.0, seconds=0.0)


def test_findings_compare_each_recipe_with_minmax_at_the_same_grouping():
    import quality_rows as qr
    from bench_quality import baseline_of, findings

    assert baseline_of("ditq W8A8 htg") == qr.BASE
    assert baseline_of("ditq W8A8 htg, 4 groups htg") == "ditq W8A8 minmax, 4 groups htg"
    assert baseline_of("ditq W8A8 minmax, 4 groups uniform") == qr.BASE
    assert baseline_of(qr.BASE) is None and baseline_of(qr.QS_ALL) is None
    for method in qr.RECONSTRUCTION_METHODS:  # a reconstruction is compared with the same row without it
        assert baseline_of(qr.reconstruction_label("w4a8", method)) == "ditq W4A8 ptq4dit, 4 groups htg"

    tight = [0.0, 0.01, -0.01, 0.0]  # leave-one-out values barely move: small jackknife errors
    results = {
        (qr.FP32, 50): _result(0.0, tight, float("inf"), None),
        (qr.BASE, 50): _result(1.0, [1 + t for t in tight], 40.0, [40 + t for t in tight]),
        ("ditq W8A8 htg", 50): _result(1.0, [1 + t for t in tight], 43.0, [43 + t for t in tight]),
        ("ditq W8A8 dilate", 50): _result(1.0, [1 + t for t in tight], 40.0, [40 - t for t in tight]),
    }

    class Args:
        steps = [50]

    text = "\n".join(findings(results, {}, Args()))
    assert "| ditq W8A8 htg | ditq W8A8 minmax | +3.00 ± 0.00 | better |" in text
    assert "| ditq W8A8 dilate | ditq W8A8 minmax | +0.00 ± 0.02 | within noise |" in text
    assert "against ditq W8A8 minmax, in PSNR: better: ditq W8A8 htg; within noise: ditq W8A8 dilate." in text
