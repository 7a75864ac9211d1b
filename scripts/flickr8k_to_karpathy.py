"""Write Karpathy's dataset_flickr8k.json from the Flickr8k text files, for machines without it.

    python scripts/flickr8k_to_karpathy.py ../shared/data/flickr8k -o dataset_flickr8k.json
    captioner evaluate --dataset karpathy --karpathy-json dataset_flickr8k.json \
        --data-root ../shared/data/flickr8k/Images --split test

Karpathy's file (caption_datasets.zip) uses the official 6,000 / 1,000 / 1,000 split (dev is
"val"), the file names and the raw captions of Flickr8k.token.txt, so `--dataset karpathy` on it
loads the records `--dataset flickr8k` loads. This reads the text files itself rather than
through captioner.datasets, so the test comparing the two checks both loaders.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

SPLIT_FILES = (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
               ("test", "Flickr_8k.testImages.txt"))


def flickr8k_karpathy(root: str | Path) -> dict:
    """{"dataset": "flickr8k", "images": [...]} in Karpathy's format: one entry per image named in a
    split file and captioned in Flickr8k.token.txt, its captions in the token file's order."""
    root = Path(root)
    captions: dict[str, list[str]] = defaultdict(list)
    for line in (root / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, _, text = line.partition("\t")
        if text.strip():
            captions[key.rsplit("#", 1)[0]].append(text.strip())
    images, sentence_id = [], 0
    for split, split_file in SPLIT_FILES:
        for name in (root / split_file).read_text().split():
            if not captions[name]:
                continue
            ids = list(range(sentence_id, sentence_id + len(captions[name])))
            sentence_id += len(ids)
            images.append({"filename": name, "imgid": len(images), "split": split, "sentids": ids,
                           "sentences": [{"raw": raw, "tokens": re.findall(r"[a-z0-9]+", raw.lower()),
                                          "imgid": len(images), "sentid": i}
                                         for raw, i in zip(captions[name], ids)]})
    return {"dataset": "flickr8k", "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the Flickr8k folder (Flickr8k.token.txt, Flickr_8k.*Images.txt)")
    parser.add_argument("-o", "--output", default="dataset_flickr8k.json")
    args = parser.parse_args()
    data = flickr8k_karpathy(args.root)
    Path(args.output).write_text(json.dumps(data))
    counts = {split: sum(image["split"] == split for image in data["images"]) for split, _ in SPLIT_FILES}
    print(f"wrote {args.output}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))


if __name__ == "__main__":
    main()
