"""Choose decoding settings on the dev split, fast: features come from the training feature cache.

    python scripts/tune_decoding.py --data-root ../shared/data/flickr8k --cache-dir ~/.cache/captioner/features \
        --checkpoint runs/seed0/best --checkpoint runs/seed1/best --beam-size 3 --length-penalty 0 0.3 0.6 1.0

Each --checkpoint alone, and all of them as an ensemble, are scored (coco-caption metrics) for every
length penalty. The cache must exist (training the checkpoints built it).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from captioner import Captioner
from captioner.config import DecodeConfig
from captioner.datasets import load_flickr8k
from captioner.encoder import encoder_digest
from captioner.features import cached_features
from captioner.evaluate import score_captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--length-penalty", type=float, nargs="+", default=[0.0])
    parser.add_argument("--no-repeat-ngram-size", type=int, nargs="+", default=[0])
    parser.add_argument("--greedy", action="store_true", help="also score greedy decoding")
    args = parser.parse_args()

    members = [Captioner.load(p, fast=False) for p in args.checkpoint]
    records = load_flickr8k(args.data_root, args.split)
    first = members[0]

    def no_encoder(_images):
        raise RuntimeError(f"no cached {args.split} features in {args.cache_dir}: train first")

    features, usable = cached_features(no_encoder, first.model_cfg.backbone, first.preprocess_cfg,
                                       [r.path for r in records], args.cache_dir, progress=False,
                                       weights=encoder_digest(first.encoder))
    rows = [i for i in range(len(records)) if usable[i]]
    refs = {records[i].image_id: records[i].captions for i in rows}
    feats = torch.from_numpy(np.asarray(features[rows], dtype=np.float32))
    candidates = [(p, m) for p, m in zip(args.checkpoint, members)]
    if len(members) > 1:
        ensemble = Captioner(first.encoder, [d for m in members for d in m.decoders], first.vocab,
                             first.model_cfg, first.preprocess_cfg)
        candidates.append(("ensemble", ensemble))
    settings = [DecodeConfig(method="beam", beam_size=args.beam_size, length_penalty=lp,
                             no_repeat_ngram_size=n)
                for lp in args.length_penalty for n in args.no_repeat_ngram_size]
    if args.greedy:
        settings.insert(0, DecodeConfig(method="greedy"))
    for name, model in candidates:
        for cfg in settings:
            caps = model.caption_features(feats, cfg)
            scores = score_captions(refs, {records[i].image_id: c.text for i, c in zip(rows, caps)})
            mean_len = np.mean([len(c.words) for c in caps])
            label = "greedy" if cfg.method == "greedy" else f"beam {cfg.beam_size} lp {cfg.length_penalty} nr {cfg.no_repeat_ngram_size}"
            print(f"{name:40s} {label:18s} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
                  + f" len {mean_len:.1f}", flush=True)


if __name__ == "__main__":
    main()
