"""Sample grids as PNG, for models whose samples are images (1 or 3 channels in [-1, 1])."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, H, W, C]`` uint8."""
    images = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


LABEL_HEIGHT = 12  # pixels under each scaled image for its label (PIL's default bitmap font is 11 px high)


def save_grid(samples: torch.Tensor, path: str | Path, labels: list | None = None, scale: int = 4,
              columns: int | None = None) -> None:
    """The samples as one PNG, ``columns`` per row (8 by default), each with its label (a class id, a prompt's
    first words) written under it where ``labels`` are given."""
    from PIL import Image

    images = to_uint8(samples)
    count, height, width, channels = images.shape
    columns = columns or min(count, 8)
    rows = math.ceil(count / columns)
    pad = 2
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top:top + height, left:left + width] = image
    picture = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if labels is not None:
        texts = [str(label) for label in labels][:count]
        picture = _with_labels(picture, texts + [""] * (count - len(texts)), columns, height, width, pad, scale)
    picture.save(path)


def _with_labels(picture, labels: list[str], columns: int, height: int, width: int, pad: int, scale: int):
    """``picture`` with a white strip under each row of images holding each image's label, cut to its width."""
    from PIL import Image, ImageDraw

    rows = math.ceil(len(labels) / columns) if labels else 0
    cell_h, cell_w = (height + pad) * scale, (width + pad) * scale
    out = Image.new(picture.mode, (picture.width, picture.height + rows * LABEL_HEIGHT), 255 if picture.mode == "L"
                    else (255, 255, 255))
    draw = ImageDraw.Draw(out)
    characters = max(1, (cell_w - 2) // 6)  # the default font is about 6 px per character
    for row in range(rows):
        band = picture.crop((0, row * cell_h, picture.width, (row + 1) * cell_h + (pad * scale if row == rows - 1 else 0)))
        out.paste(band, (0, row * (cell_h + LABEL_HEIGHT)))
        for column in range(columns):
            index = row * columns + column
            if index < len(labels):
                text = labels[index][:characters]
                draw.text((column * cell_w + pad * scale, row * (cell_h + LABEL_HEIGHT) + cell_h),
                          text, fill=0 if picture.mode == "L" else (0, 0, 0))
    return out
