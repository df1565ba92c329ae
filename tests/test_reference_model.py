"""Regression guard on the bundled reference DiT: the W8A8 artifact must stay consistent with FP.

A regression in any pass (a wrong scale, a lost layer, a bad fold) shows here as a PSNR drop.
"""

import sys
from pathlib import Path

import torch

from conftest import REFERENCE_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

STEPS, LABELS = 25, list(range(10))
# Measured 41.1 dB at this setting when the test was written; 35 dB leaves room for platform noise while a
# broken pass (a mis-scaled or lost layer) costs far more.
MIN_PSNR_DB = 35.0


def test_reference_model_is_bundled_with_its_scheduler():
    assert (REFERENCE_MODEL / "transformer" / "config.json").is_file()
    assert (REFERENCE_MODEL / "scheduler" / "scheduler_config.json").is_file()


def test_w8a8_reference_artifact_stays_consistent_with_fp(reference_artifact):
    from evaluator import psnr

    from ditq_compiler.loading import load_checkpoint
    from ditq_compiler.sampling import sample

    loaded = load_checkpoint(REFERENCE_MODEL)
    with torch.no_grad():
        fp = sample(lambda x, t, y: loaded.model(x, timestep=t, class_labels=y).sample, loaded.scheduler_config,
                    loaded.model_config, LABELS, steps=STEPS, guidance_scale=4.0, seed=0)
    quantized = reference_artifact.sample(LABELS, steps=STEPS, guidance_scale=4.0, seed=0, provider="cpu")
    value = psnr(quantized, fp)
    assert value >= MIN_PSNR_DB, f"W8A8 vs FP PSNR {value:.2f} dB < {MIN_PSNR_DB} dB"
    assert reference_artifact.manifest["fusion"]["unfused"] == {}
