"""Regression guard on the bundled reference DiT: the W8A8 artifact must stay consistent with FP.

A regression in any pass (a wrong scale, a lost layer, a bad fold) shows here as a PSNR drop.
"""

import sys
from pathlib import Path

import torch

from conftest import REFERENCE_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

STEPS, LABELS = 25, list(range(10))
# The mean over several sampling seeds: one seed's PSNR is chaotic. A rounding flip in one activation quantizer
# moves the next step's input, and 25 guided steps amplify it: two lowerings that agree to 2e-5 per call (the
# float attention fused into MultiHeadAttention or not) end 2.8 dB apart on seed 0 (34.4 vs 37.2 dB), while
# their means over seeds 0-7 agree (39.1 +- 0.7 vs 39.2 +- 0.4 dB). Measured 41.1 dB on seed 0 when the test
# was written; 35 dB leaves room for that noise while a broken pass (a mis-scaled or lost layer) costs far more.
SEEDS = (0, 1, 2, 3)
MIN_PSNR_DB = 35.0


def test_reference_model_is_bundled_with_its_scheduler():
    assert (REFERENCE_MODEL / "transformer" / "config.json").is_file()
    assert (REFERENCE_MODEL / "scheduler" / "scheduler_config.json").is_file()


def test_w8a8_reference_artifact_stays_consistent_with_fp(reference_artifact):
    from evaluator import psnr

    from ditq_compiler.loading import load_checkpoint
    from ditq_compiler.sampling import sample

    loaded = load_checkpoint(REFERENCE_MODEL)
    values = []
    for seed in SEEDS:
        with torch.no_grad():
            fp = sample(loaded.family, lambda x, t, y: loaded.model(x, timestep=t, class_labels=y).sample, loaded.scheduler_config,
                        loaded.model_config, LABELS, steps=STEPS, guidance_scale=4.0, seed=seed)
        quantized = reference_artifact.sample(LABELS, steps=STEPS, guidance_scale=4.0, seed=seed, provider="cpu")
        values.append(psnr(quantized, fp))
    mean = sum(values) / len(values)
    assert mean >= MIN_PSNR_DB, \
        f"W8A8 vs FP PSNR {mean:.2f} dB < {MIN_PSNR_DB} dB (seeds {SEEDS}: {', '.join(f'{v:.2f}' for v in values)})"
    assert reference_artifact.manifest["fusion"]["unfused"] == {}
