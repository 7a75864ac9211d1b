"""Do captions hold up on photos of other shapes? (checkpoints/README.md, "aspect ratio").

The Flickr8k copies in ../shared are 224x224 squashed from ~4:3 originals. This script rebuilds
test photos at other shapes -- 4:3 (un-squashed, like the originals), 16:9 and 3:4 by padding or
cropping the 4:3 version, and a 2x upscaled 4:3 -- and scores the model's captions on each, for
the resize modes of the preprocessing (squash | center_crop | pad).

    python scripts/aspect_check.py --data-root ../shared/data/flickr8k --checkpoint checkpoints \
        --images 500 --modes squash pad center_crop
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from PIL import Image

from captioner import Captioner
from captioner.datasets import ImageCaptions, load_flickr8k
from captioner.evaluate import evaluate_records


def variant(image: Image.Image, name: str) -> Image.Image:
    photo = image.resize((400, 300), Image.BICUBIC)           # the original ~4:3 shape
    if name == "original_224_squashed":
        return image
    if name == "4:3":
        return photo
    if name == "4:3_x2":
        return photo.resize((800, 600), Image.BICUBIC)
    if name == "16:9_padded":
        canvas = Image.new("RGB", (534, 300), (0, 0, 0))
        canvas.paste(photo, (67, 0))
        return canvas
    if name == "16:9_cropped":
        return photo.crop((0, 37, 400, 262))
    if name == "3:4_cropped":
        return photo.crop((87, 0, 312, 300))
    raise ValueError(name)


VARIANTS = ["original_224_squashed", "4:3", "4:3_x2", "16:9_padded", "16:9_cropped", "3:4_cropped"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--modes", nargs="+", default=["squash", "pad", "center_crop"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--method", default="beam")
    args = parser.parse_args()

    captioner = Captioner.load(args.checkpoint)
    records = load_flickr8k(args.data_root, args.split)[: args.images]
    cfg = captioner.decode_config(method=args.method)
    original_pre = captioner.preprocess_cfg
    print(f"{len(records)} {args.split} images, {cfg.method} decoding; CIDEr / BLEU-4 / METEOR")
    print(f"{'variant':24s}" + "".join(f"{m:>24s}" for m in args.modes))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            folder = Path(tmp) / name.replace(":", "x")
            folder.mkdir()
            moved = []
            for r in records:
                path = folder / Path(r.path).name
                variant(Image.open(r.path).convert("RGB"), name).save(path, quality=92)
                moved.append(ImageCaptions(r.image_id, str(path), r.captions))
            cells = []
            for mode in args.modes:
                captioner.preprocess_cfg = dataclasses.replace(original_pre, resize=mode)
                scores, _ = evaluate_records(captioner, moved, cfg, progress=False)
                cells.append(f"{scores['CIDEr']:.3f} / {scores['BLEU-4']:.3f} / {scores['METEOR']:.3f}")
            print(f"{name:24s}" + "".join(f"{c:>24s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
