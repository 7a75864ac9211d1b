"""Batch captioning for `captioner caption`: inputs -> JSON Lines / CSV rows, one per image."""
from __future__ import annotations

import csv
import glob
import json
import os
import sys
from pathlib import Path

from .preprocess import is_image_file


def expand_inputs(inputs: list[str]) -> list[str]:
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                paths += [os.path.join(root, f) for f in sorted(files)]
        elif any(ch in item for ch in "*?[") and not os.path.exists(item):
            paths += sorted(glob.glob(item, recursive=True))
        else:
            paths.append(item)
    return paths


def caption_inputs(args) -> int:
    from .api import Captioner
    from .datasets import image_loader

    captioner = Captioner.load(args.checkpoint, device=args.device)
    cfg = captioner.decode_config(**{k: getattr(args, k) for k in
                                     ("method", "beam_size", "max_len", "length_penalty",
                                      "temperature", "top_k", "top_p", "seed")})
    paths = expand_inputs(args.inputs)
    candidates = [p for p in paths if not os.path.isdir(p)]
    out = open(args.output, "a", newline="") if args.output else sys.stdout
    as_csv = bool(args.output) and args.output.endswith(".csv")
    writer = csv.writer(out) if as_csv else None
    failed = 0

    def write(row: dict) -> None:
        if writer:
            writer.writerow([row["image"], row.get("caption", ""), row.get("score", ""), row.get("error", "")])
        else:
            out.write(json.dumps(row) + "\n")

    loader = image_loader(candidates, captioner.preprocess_cfg, args.batch_size, num_workers=2)
    for indices, images, errors in loader:
        if images is not None:
            for i, cap in zip(indices, captioner.caption_features(captioner.encode(images), cfg)):
                write({"image": candidates[i], "caption": cap.text, "score": round(cap.score, 4)})
        for i, err in errors:
            failed += 1
            print(f"captioner: {candidates[i]}: {err}", file=sys.stderr)
            write({"image": candidates[i], "error": err})
        out.flush()
    if args.output:
        out.close()
    return 1 if failed else 0
