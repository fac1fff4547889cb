#!/usr/bin/env python3
"""Small JPEGs in every layout the crate's scaled JPEG decoder reads, and some it leaves to
jpeg-decoder, for `src/data/jpeg`'s tests: `tests/fixtures/jpeg/*.jpg`.

    python3 scripts/make_jpeg_fixtures.py

All from `assets/rocket.jpg` (skimage, CC0) at 333x250, a size that fills no MCU row or column,
so the edges' partial blocks are decoded too.
"""

import os

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "jpeg")


def main():
    os.makedirs(OUT, exist_ok=True)
    image = Image.open(os.path.join(ROOT, "assets", "rocket.jpg")).convert("RGB")
    image = image.resize((333, 250), Image.LANCZOS)
    variants = {
        "444.jpg": dict(subsampling="4:4:4", quality=95),
        "422.jpg": dict(subsampling="4:2:2", quality=90),
        "420.jpg": dict(subsampling="4:2:0", quality=75),
        # A restart marker every 5 MCUs: 14 restarts per MCU row, 8 markers wrap around.
        "420-restarts.jpg": dict(subsampling="4:2:0", quality=85, restart_marker_blocks=5),
        "progressive.jpg": dict(subsampling="4:2:0", quality=85, progressive=True),
    }
    for name, options in variants.items():
        image.save(os.path.join(OUT, name), **options)
    image.convert("L").save(os.path.join(OUT, "grey.jpg"), quality=90)
    for name in sorted(os.listdir(OUT)):
        print(name, os.path.getsize(os.path.join(OUT, name)))


if __name__ == "__main__":
    main()
