"""Score the rows `captioner caption` wrote against a Flickr8k split's references.

    captioner caption $(sed 's|^|../shared/data/flickr8k/Images/|' ../shared/data/flickr8k/Flickr_8k.testImages.txt) \
        -o runs/test_captions.jsonl --quiet
    python scripts/score_jsonl.py runs/test_captions.jsonl --data-root ../shared/data/flickr8k --split test

Prints the same coco-caption metrics as `captioner evaluate` (pycocoevalcap scorers).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.datasets import load_flickr8k
from captioner.evaluate import format_scores, score_captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    records = {Path(r.path).name: r for r in load_flickr8k(args.data_root, args.split)}
    rows = [json.loads(line) for line in open(args.jsonl) if line.strip()]
    captions = {Path(row["image"]).name: row["caption"] for row in rows if "caption" in row}
    missing = set(records) - set(captions)
    if missing:
        raise SystemExit(f"{len(missing)} {args.split} images have no caption in {args.jsonl}")
    refs = {name: records[name].captions for name in records}
    print(f"{len(captions)} captions from {args.jsonl}")
    print(format_scores(score_captions(refs, {name: captions[name] for name in records})))


if __name__ == "__main__":
    main()
