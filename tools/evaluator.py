"""The digits evaluator: a small CNN classifier and the metrics the quality benchmark reports.

Metrics, as papers report them for ImageNet, transposed to digits:
* class accuracy of generated samples w.r.t. the label they were generated for;
* Fréchet distance between generated and real digits in the classifier's 128-d feature space ("our FID");
* consistency with the FP model from the same noise: PSNR (peak-to-peak 2, samples live in [-1, 1]) and
  relative L2 of the final samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

FEATURES = 128


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),   # 8x8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),   # 4x4
            nn.Flatten(), nn.Linear(64 * 16, FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_classifier(path: str | Path) -> DigitClassifier:
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(str(Path(path) / "classifier.safetensors")))
    return model.eval()


def save_classifier(model: DigitClassifier, path: str | Path, info: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "classifier.safetensors"))
    (path / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")


@torch.no_grad()
def features_and_logits(model: DigitClassifier, images: torch.Tensor, batch: int = 512):
    feats, logits = [], []
    for start in range(0, images.shape[0], batch):
        f = model.features(images[start:start + batch].clamp(-1, 1))
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats).double().numpy(), torch.cat(logits)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # the usual epsilon fix for near-singular covariances
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def psnr(samples: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(((samples.clamp(-1, 1) - reference.clamp(-1, 1)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def relative_l2(samples: torch.Tensor, reference: torch.Tensor) -> float:
    return float((samples - reference).norm() / reference.norm())
