"""Shared by test_train.py and test_distributed.py: a Karpathy split file over the coco_tiny
photos sized for exact comparisons, and the `captioner train` options of a seconds-long run."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import requires_java  # noqa: F401  (validation scores with Java)
from safetensors.torch import load_file

COCO_TINY = Path(__file__).resolve().parent / "fixtures" / "coco_tiny"


def karpathy_split(folder: Path) -> Path:
    """dataset_coco.json with 4 train images (20 captions: 5 global batches of 4 that split over
    2 ranks without padding), 1 val and 1 test image, all real coco_tiny photos."""
    data = json.loads((COCO_TINY / "dataset_coco.json").read_text())
    images = [image for image in data["images"] if len(image["sentences"]) == 5
              and (COCO_TINY / image["filepath"] / image["filename"]).is_file()][:6]
    assert len(images) == 6, "coco_tiny changed: this split needs 6 readable images with 5 captions"
    for image, split in zip(images, ["train"] * 4 + ["val", "test"]):
        image["split"] = split
    path = folder / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def train_args(split_json: Path, output: Path, cache_dir: Path, **options) -> list[str]:
    """`captioner train` arguments: a 32-wide decoder, 2 epochs of 5 steps, a resumable checkpoint
    every 3 steps (at steps 3, 5 = end of epoch 1, 6, 9, 10). Options use dashes in names,
    `name=True` for flags, `name=None` to leave a default option out."""
    values = {"dataset": "coco", "data-root": COCO_TINY, "karpathy-json": split_json,
              "output": output, "cache-dir": cache_dir, "epochs": 2, "batch-size": 4,
              "embed-dim": 32, "hidden-dim": 32, "dropout": 0.0, "min-word-count": 1, "lr": 0.01,
              "warmup-steps": 0, "checkpoint-every": 3, "num-workers": 0, "seed": 3}
    values.update({k.replace("_", "-"): v for k, v in options.items()})
    args = ["train"]
    for name, value in values.items():
        if value is not None:
            args += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return args


def checkpoint_tensors(path: Path, prefix: str) -> dict:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
