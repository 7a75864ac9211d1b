"""Draw a results sheet: a grid of test photos, each with its generated caption and one reference.

    python scripts/results_sheet.py --data-root ../shared/data/flickr8k --json runs/test_beam3.json \
        --out docs/results_sheet.png

--json is the file `captioner evaluate --json` wrote (it holds the generated captions).
"""
from __future__ import annotations

import argparse
import json
import random
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from captioner.datasets import load_flickr8k  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--json", required=True, help="output of captioner evaluate --json")
    parser.add_argument("--out", default="docs/results_sheet.png")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    captions = json.load(open(args.json))["captions"]
    records = [r for r in load_flickr8k(args.data_root, "test") if r.image_id in captions]
    chosen = random.Random(args.seed).sample(records, min(args.count, len(records)))
    cols = 4
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 4.2, rows * 4.6))
    for ax, record in zip(axes.flat, chosen):
        # The shared copies are squashed to 224x224; show them at the usual 4:3 of Flickr photos.
        ax.imshow(Image.open(record.path).convert("RGB").resize((300, 225)))
        ax.set_axis_off()
        generated = textwrap.fill(captions[record.image_id], 38)
        reference = textwrap.fill(record.captions[0].rstrip(" ."), 40)
        ax.set_title(f"{generated}\n", fontsize=10.5, fontweight="bold", loc="left")
        ax.text(0, -0.02, f"ref: {reference}", transform=ax.transAxes, fontsize=8.5, va="top",
                color="#555555")
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_axis_off()
    fig.suptitle("captioner on Flickr8k test photos (bold: generated, beam 3; grey: one human reference)",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
