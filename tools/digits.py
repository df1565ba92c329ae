"""scikit-learn's 8x8 digits (shipped inside scikit-learn), upsampled to 16x16 and scaled to [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10


def load_digits_tensors(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, size, size]`` in [-1, 1] and labels ``[N]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(digits.target, dtype=torch.int64)
