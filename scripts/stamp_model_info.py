"""Record measured scores and the recipe in a checkpoint's header (`info`), where the web UI and
`Captioner.info` read them. Rewrites the file atomically; the weights are unchanged.

    python scripts/stamp_model_info.py checkpoints/model.safetensors --decode length_penalty=0.5 \
        --scores test=runs/flickr8k/test_beam3.json --recipe "make train-flickr8k" --half
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from captioner import Captioner
from captioner.config import check_config


def json_items(items: list[str]) -> dict:
    """["KEY=JSON", ...] -> {KEY: value}."""
    return {key: json.loads(value) for key, value in (item.split("=", 1) for item in items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--scores", action="append", default=[], metavar="NAME=EVALUATE_JSON",
                        help="e.g. test=out.json (the file `captioner evaluate --json` wrote)")
    parser.add_argument("--recipe", help="the command that reproduces this model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="any other info entry")
    parser.add_argument("--decode", action="append", default=[], metavar="FIELD=JSON",
                        help="default decoding setting stored in the checkpoint, e.g. length_penalty=0.5")
    parser.add_argument("--preprocess", action="append", default=[], metavar="FIELD=JSON",
                        help='image preprocessing stored in the checkpoint, e.g. resize=\'"center_crop"\'')
    parser.add_argument("--half", action="store_true", help="store weights as fp16")
    args = parser.parse_args()

    captioner = Captioner.load(args.checkpoint, fast=False)
    info = {}
    for item in args.scores:
        name, path = item.split("=", 1)
        result = json.load(open(path))
        info[f"{name}_scores"] = {k: round(v, 4) for k, v in result["scores"].items()}
        info[f"{name}_decode"] = {k: result["decode"][k] for k in ("method", "beam_size", "length_penalty")}
    if args.recipe:
        info["recipe"] = args.recipe
    info.update(json_items(args.set))
    captioner.decode_cfg = dataclasses.replace(captioner.decode_cfg, **json_items(args.decode))
    captioner.preprocess_cfg = check_config(dataclasses.replace(captioner.preprocess_cfg, **json_items(args.preprocess)))
    captioner.save(args.checkpoint, half=args.half, info=info)
    print(json.dumps({**captioner.info, **info}, indent=1)[:2000])


if __name__ == "__main__":
    main()
