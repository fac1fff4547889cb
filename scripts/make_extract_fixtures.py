#!/usr/bin/env python3
"""Writes the fixtures that check extract-fc7's preprocessing against torchvision's pipeline.

    pip install torch torchvision safetensors
    python3 scripts/make_extract_fixtures.py   # rewrites tests/fixtures/extract/

For each bundled photo (assets/chelsea.png, coffee.png, rocket.jpg) and for `rocket-3x.jpg`, a
2.5 MP JPEG that this script makes from rocket.jpg (Lanczos, 3x each side, quality 85) so that the
crate's DCT-scaled decode of large JPEGs is checked against PIL's full decode:
- `{photo}.crop.png`: torchvision's `Resize(256)` + `CenterCrop(224)` of `PIL.Image.open`, as the
  uint8 image that `ToTensor` and `Normalize` then scale: torch's preprocessed tensor, exactly;
- `torch_fc7.safetensors`: fc7 (after ReLU) of torchvision's `alexnet()` with the formula weights
  of make_fixtures.py on torch's full pipeline (`ToTensor`, `Normalize`).
"""

import os
import sys

import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import det_state_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "extract")
PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "rocket-3x.jpg"]
BIG = "rocket-3x.jpg"


def photo_path(photo):
    return os.path.join(OUT if photo == BIG else os.path.join(ROOT, "assets"), photo)


def make_big():
    image = Image.open(os.path.join(ROOT, "assets", "rocket.jpg")).convert("RGB")
    big = image.resize((image.width * 3, image.height * 3), Image.LANCZOS)
    big.save(os.path.join(OUT, BIG), quality=85)


def main():
    torch.set_grad_enabled(False)
    os.makedirs(OUT, exist_ok=True)
    make_big()
    model = torchvision.models.alexnet()
    model.load_state_dict(det_state_dict(model))
    model.eval()
    crop = T.Compose([T.Resize(256), T.CenterCrop(224)])
    norm = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    fc7 = {}
    for photo in PHOTOS:
        image = crop(Image.open(photo_path(photo)).convert("RGB"))
        image.save(os.path.join(OUT, f"{photo}.crop.png"))
        x = norm(image).unsqueeze(0)
        h = model.avgpool(model.features(x)).flatten(1)
        fc7[photo] = model.classifier[:6](h)[0].contiguous()
    save_file(fc7, os.path.join(OUT, "torch_fc7.safetensors"),
              metadata={"torch": torch.__version__, "torchvision": torchvision.__version__})
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
