"""The digits evaluator: a small CNN classifier and the metrics the quality benchmark reports.

Metrics, as papers report them for ImageNet, transposed to digits:
* class accuracy of generated samples w.r.t. the label they were generated for;
* distribution distances in a feature space of the classifier (:func:`feature_space`: its 128-d feature
  layer, its 10 logits, their softmax, or a PCA of the features fitted on the real digits): the Fréchet
  distance (:func:`frechet_distance`, "FID"), the kernel distance (:func:`kernel_distance`, "KID") and its
  per-class mean (:func:`class_kernel_distance`), against the real digits or against the FP model's own
  samples. The benchmark reports KID per class in the 128-d features against FP32 samples from other noise
  (docs/quality_metric.md says why);
* consistency with the FP model from the same noise: PSNR (peak-to-peak 2, samples live in [-1, 1]) and
  relative L2 of the final samples;
* jackknife standard errors (:func:`jackknife_std`) from leave-one-out values, which the KID and PSNR
  functions ending in ``_jackknife`` return.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
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
    """The classifier's 128-d features (float64 numpy) and its logits (torch) for ``images`` clamped to
    [-1, 1]."""
    feats, logits = [], []
    for start in range(0, images.shape[0], batch):
        f = model.features(images[start:start + batch].clamp(-1, 1))
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats).double().numpy(), torch.cat(logits)


@dataclass(frozen=True)
class PCA:
    """A linear projection onto the top principal components of a reference set: ``(x - mean) @ V_k``."""

    mean: np.ndarray
    components: np.ndarray  # [k, d], rows orthonormal

    @classmethod
    def fit(cls, reference: np.ndarray, dims: int) -> "PCA":
        reference = np.asarray(reference, dtype=np.float64)
        mean = reference.mean(0)
        _, _, vt = np.linalg.svd(reference - mean, full_matrices=False)
        return cls(mean, vt[:dims])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


FEATURE_SPACES = ("features", "logits", "probabilities", "pca")


def feature_space(name: str, model: DigitClassifier, real: torch.Tensor, *, pca_dims: int = 16):
    """``embed(images) -> [N, d]`` float64 array in one of the classifier's spaces:

    * ``features``: the 128-d feature layer (ReLU outputs), what "our FID" used;
    * ``logits``: the 10 class logits; ``probabilities``: their softmax;
    * ``pca``: the features projected on their top ``pca_dims`` principal components over ``real``.
    """
    if name not in FEATURE_SPACES:
        raise ValueError(f"unknown feature space {name!r}; choose one of {', '.join(FEATURE_SPACES)}")
    if name == "pca":
        projection = PCA.fit(features_and_logits(model, real)[0], pca_dims)

    def embed(images: torch.Tensor) -> np.ndarray:
        feats, logits = features_and_logits(model, images)
        if name == "features":
            return feats
        if name == "logits":
            return logits.double().numpy()
        if name == "probabilities":
            return torch.softmax(logits.double(), dim=1).numpy()
        return projection(feats)
    return embed


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to ``a`` and ``b`` (Heusel et al. 2017, "FID"):
    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``. Biased upwards by an amount that falls like
    ``1 / n`` with the sample count ``n`` (Chong & Forsyth 2020), so compare values only at equal counts."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # fewer samples than dimensions: singular covariances, as with 100 in 128-d
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # the usual epsilon fix for near-singular covariances
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel, ``k(x, y) = (x . y / d + 1)^3`` for ``d``-dimensional rows."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel (Bińkowski et al. 2018, "Demystifying MMD
    GANs", the kernel inception distance "KID"):
    ``sum_{i!=j} k(a_i, a_j) / (m(m-1)) + sum_{i!=j} k(b_i, b_j) / (n(n-1)) - 2 sum_{i,j} k(a_i, b_j) / (mn)``.
    Its expectation is 0 when the rows of ``a`` and of ``b`` are independent draws from one distribution,
    whatever the sample counts (a value may then be slightly negative)."""
    return kernel_distance_jackknife(a, b)[0]


def kernel_distance_jackknife(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """:func:`kernel_distance` and its leave-one-out values over the rows of ``a`` (``[m]``: the distance
    with ``a_i`` left out), for :func:`jackknife_std`. ``b`` is the fixed reference."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    m, n = a.shape[0], b.shape[0]
    if m < 3 or n < 2:
        raise ValueError(f"the kernel distance needs at least 3 and 2 samples, got {m} and {n}")
    k_aa, k_bb, k_ab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    np.fill_diagonal(k_aa, 0.0)
    np.fill_diagonal(k_bb, 0.0)
    within_b = k_bb.sum() / (n * (n - 1))
    value = k_aa.sum() / (m * (m - 1)) + within_b - 2 * k_ab.sum() / (m * n)
    left_out = ((k_aa.sum() - 2 * k_aa.sum(1)) / ((m - 1) * (m - 2)) + within_b
                - 2 * (k_ab.sum() - k_ab.sum(1)) / ((m - 1) * n))
    return float(value), left_out


def class_kernel_distance(a: np.ndarray, a_classes, b: np.ndarray, b_classes) -> tuple[float, np.ndarray]:
    """Class-conditional KID: the mean over classes ``c`` of ``kernel_distance(a[a_classes == c],
    b[b_classes == c])``, and its leave-one-out values over the rows of ``a`` (aligned with ``a``).

    Why per class: the benchmark samples the classes in turn, so its samples are stratified, not
    independent draws of the marginal; the unbiased estimator's within-set term then sees fewer same-class
    pairs than its cross term, and plain KID between two such sets of one model comes out negative. Per
    class the samples are independent draws of ``p(x | c)``, and the mean has expectation 0 for equal
    models."""
    a_classes, b_classes = np.asarray(a_classes), np.asarray(b_classes)
    classes = np.unique(a_classes)
    value, left_out = 0.0, np.empty(a.shape[0])
    per_class = {}
    for c in classes:
        per_class[c] = kernel_distance_jackknife(a[a_classes == c], b[b_classes == c])
        value += per_class[c][0] / len(classes)
    for c in classes:
        # leaving out a_i changes only its own class's term
        left_out[a_classes == c] = value + (per_class[c][1] - per_class[c][0]) / len(classes)
    return float(value), left_out


def jackknife_std(left_out: np.ndarray) -> float:
    """Jackknife standard error from leave-one-out values ``t_(i)`` (Quenouille-Tukey; Efron & Stein 1981):
    ``sqrt((n - 1) / n * sum_i (t_(i) - mean t)^2)``. For a difference of two statistics on paired samples
    (the same noise), pass the difference of their leave-one-out values. It errs on the large side for
    U-statistics such as KID (Efron & Stein's inequality)."""
    left_out = np.asarray(left_out, dtype=np.float64)
    n = left_out.shape[0]
    return float(np.sqrt((n - 1) / n * ((left_out - left_out.mean()) ** 2).sum()))


def psnr_jackknife(samples: torch.Tensor, reference: torch.Tensor) -> tuple[float, np.ndarray]:
    """:func:`psnr` and its leave-one-out values over the samples (``[n]``), for :func:`jackknife_std`."""
    errors = ((samples.clamp(-1, 1) - reference.clamp(-1, 1)) ** 2).flatten(1).mean(1).double().numpy()
    n = errors.shape[0]
    with np.errstate(divide="ignore"):
        value = 10 * np.log10(4.0 / errors.mean())
        left_out = 10 * np.log10(4.0 / ((errors.sum() - errors) / (n - 1)))
    return float(value), left_out


def psnr(samples: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(((samples.clamp(-1, 1) - reference.clamp(-1, 1)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def relative_l2(samples: torch.Tensor, reference: torch.Tensor) -> float:
    return float((samples - reference).norm() / reference.norm())
