"""Train the digits evaluator (a small CNN) used by the quality benchmark.

    python tools/train_classifier.py --out models/digits-classifier --seed 0

Trained on 80% of scikit-learn's digits (16x16, [-1, 1]) with small shifts and noise so that it judges
generated digits, not pixel-exact copies; reports held-out accuracy in classifier.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import load_digits_tensors  # noqa: E402
from evaluator import DigitClassifier, save_classifier  # noqa: E402


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return (x + 0.1 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/digits-classifier"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_tensors()
    order = torch.randperm(images.shape[0], generator=generator)
    split = int(0.8 * len(order))
    train, test = order[:split], order[split:]
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(64):
            loss = F.cross_entropy(model(augment(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[test]).argmax(1) == labels[test]).float().mean())
    info = {"held_out_accuracy": round(accuracy, 4), "train_images": len(train), "test_images": len(test),
            "epochs": args.epochs, "seed": args.seed, "seconds": round(time.time() - start, 1),
            "data": "sklearn digits 16x16 in [-1, 1]; augmentation: +-1 pixel shifts, N(0, 0.1) noise",
            "features": "128-d penultimate layer (used for the Frechet distance)"}
    save_classifier(model, args.out, info)
    print(info)


if __name__ == "__main__":
    main()
