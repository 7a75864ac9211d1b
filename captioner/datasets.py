"""Caption datasets (Flickr8k, COCO via pycocotools + the Karpathy split) and the token dataset
the decoder trains on (the feature cache of a frozen CNN is in features.py).

Messy data is expected: images that are missing or unreadable and captions that point to no image
are skipped and counted in ONE warning, never a crash.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .vocab import Vocabulary


@dataclass
class ImageCaptions:
    image_id: str            # stable id: the file name for Flickr8k, the COCO image id for COCO
    path: str
    captions: list[str]


FLICKR_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                      "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def warn_skipped(source: str, counts: dict[str, int]) -> None:
    counts = {k: v for k, v in counts.items() if v}
    if counts:
        detail = ", ".join(f"{n} {what}" for what, n in counts.items())
        warnings.warn(f"{source}: skipped {detail}", stacklevel=3)


def load_flickr8k(root: str | os.PathLike, split: str = "train") -> list[ImageCaptions]:
    """Flickr8k layout: Images/, Flickr8k.token.txt, Flickr_8k.{train,dev,test}Images.txt."""
    root = Path(root)
    if split not in FLICKR_SPLIT_FILES:
        raise ValueError(f"unknown Flickr8k split {split!r} (train | dev | test)")
    token_file, split_file = root / "Flickr8k.token.txt", root / FLICKR_SPLIT_FILES[split]
    for needed in (token_file, split_file, root / "Images"):
        if not needed.exists():
            raise FileNotFoundError(f"Flickr8k: {needed} not found (see data/README.md)")
    wanted = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    wanted_set = set(wanted)
    on_disk = set(os.listdir(root / "Images"))
    captions: dict[str, list[str]] = defaultdict(list)
    skipped = {"malformed caption lines": 0, "captions that point to no image": 0}
    for line in token_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        key, _, text = line.partition("\t")
        name = key.rsplit("#", 1)[0]
        if not text.strip():
            skipped["malformed caption lines"] += 1
        elif name in wanted_set:
            captions[name].append(text.strip())
        elif name not in on_disk:
            # e.g. the real line "2258277193_586949ec62.jpg.1#0"; a wanted image that is absent
            # is counted once as a missing image by keep_existing instead.
            skipped["captions that point to no image"] += 1
    return keep_existing(
        [ImageCaptions(n, str(root / "Images" / n), captions[n]) for n in wanted],
        f"Flickr8k {split}", skipped)


def keep_existing(records: list[ImageCaptions], source: str,
                  skipped: dict[str, int] | None = None) -> list[ImageCaptions]:
    """Drop records without captions or without an image file; one warning with the counts."""
    skipped = dict(skipped or {})
    kept = []
    for r in records:
        if not r.captions:
            skipped["images without captions"] = skipped.get("images without captions", 0) + 1
        elif not os.path.isfile(r.path):
            skipped["missing images"] = skipped.get("missing images", 0) + 1
        else:
            kept.append(r)
    warn_skipped(source, skipped)
    return kept


def load_coco(root: str | os.PathLike, split: str = "train2017",
              karpathy_json: str | os.PathLike | None = None) -> list[ImageCaptions]:
    """COCO captions.

    Without karpathy_json: `root/annotations/captions_<split>.json` read with pycocotools, images
    in `root/<split>/`. With karpathy_json (dataset_coco.json), `split` is a Karpathy split name
    (train | val | test | restval; "train" includes restval as usual) and `filepath/filename`
    entries are resolved under root.
    """
    root = Path(root)
    if karpathy_json:
        return load_karpathy(root, split, karpathy_json)
    from pycocotools.coco import COCO

    annotation_file = root / "annotations" / f"captions_{split}.json"
    if not annotation_file.is_file():
        raise FileNotFoundError(f"COCO: {annotation_file} not found (see data/README.md)")
    with quiet_stdout():
        coco = COCO(str(annotation_file))
    by_image: dict[int, list[str]] = defaultdict(list)
    skipped = {"captions that point to no image": 0, "empty captions": 0}
    for ann in coco.dataset.get("annotations", []):
        caption = str(ann.get("caption") or "").strip()
        if ann.get("image_id") not in coco.imgs:
            skipped["captions that point to no image"] += 1
        elif not caption:
            skipped["empty captions"] += 1
        else:
            by_image[ann["image_id"]].append(caption)
    records = [ImageCaptions(str(img_id), str(root / split / info["file_name"]), by_image[img_id])
               for img_id, info in sorted(coco.imgs.items())]
    return keep_existing(records, f"COCO {split}", skipped)


KARPATHY_SPLITS = {"train": {"train", "restval"}, "restval": {"restval"}, "val": {"val"},
                   "test": {"test"}}


def load_karpathy(root: Path, split: str, karpathy_json) -> list[ImageCaptions]:
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"Karpathy split {split!r}: use train (train + restval), restval, val or test")
    data = json.loads(Path(karpathy_json).read_text())
    splits = KARPATHY_SPLITS[split]
    records = []
    for image in data["images"]:
        if image.get("split") in splits:
            path = karpathy_image_path(root, image)
            image_id = str(image.get("cocoid", image.get("imgid", image["filename"])))
            captions = [s.get("raw") or " ".join(s["tokens"]) for s in image.get("sentences", [])]
            records.append(ImageCaptions(image_id, str(path), captions))
    return keep_existing(records, f"Karpathy {split}")


def karpathy_image_path(root: Path, image: dict) -> Path:
    """The split file names COCO 2014 files (val2014/COCO_val2014_<id>.jpg); COCO 2017 has the same
    photos renamed <cocoid:012d>.jpg and regrouped into train2017/ and val2017/, found by cocoid."""
    path = root / image.get("filepath", "") / image["filename"]
    if path.is_file() or "cocoid" not in image:
        return path
    for folder in ("train2017", "val2017"):
        candidate = root / folder / f"{int(image['cocoid']):012d}.jpg"
        if candidate.is_file():
            return candidate
    return path


class quiet_stdout:
    """pycocotools prints progress to stdout, which would corrupt JSON Lines on stdout."""

    def __enter__(self):
        import contextlib
        import io
        self._ctx = contextlib.redirect_stdout(io.StringIO())
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def holdout_split(records: list[ImageCaptions], fraction: float, seed: int = 0
                  ) -> tuple[list[ImageCaptions], list[ImageCaptions]]:
    """Deterministically hold out a part of train for validation (at least one image)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * fraction))) if len(records) > 1 else 0
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])


# ---------------------------------------------------------------------------------------------
# Token dataset for the decoder
class CaptionTokens(Dataset):
    """(feature row, caption token ids) pairs: one item per caption of every readable image."""

    def __init__(self, records: list[ImageCaptions], vocab: Vocabulary, max_len: int,
                 usable: np.ndarray | None = None):
        self.items: list[tuple[int, list[int]]] = []
        for row, record in enumerate(records):
            if usable is not None and not usable[row]:
                continue
            for caption in record.captions:
                self.items.append((row, vocab.encode(caption, max_len)))
        self.pad_id = vocab.pad_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, list[int]]:
        return self.items[i]


def pad_tokens(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_id, dtype=torch.long)   # (B, T)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
