"""How much an ensemble's members disagree: per-word negative log-likelihood of the references.

    python scripts/member_nll.py --data-root ../shared/data/flickr8k --cache-dir runs/ensemble-flickr8k/cache \
        runs/ensemble-flickr8k/round1.safetensors runs/ensemble-flickr8k/sampling/best

Teacher forcing on every reference caption of the split (cached features, as in training): the
mean NLL per word of each member alone, then of the ensemble (the members' word probabilities
averaged, as Captioner decodes). Averaging always lowers the members' mean NLL (Jensen); by little
when the members are near copies of each other, by a lot when they are independent models.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from captioner import Captioner
from captioner.datasets import load_flickr8k, pad_tokens
from captioner.distributed import World
from captioner.features import feature_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("members", nargs="+", help="checkpoints sharing the CNN and vocabulary")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--split", default="dev")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    members = [Captioner.load(p, fast=False) for p in args.members]
    first = members[0]
    records = load_flickr8k(args.data_root, args.split)
    # The first member's CNN names the cache entry (computed here if missing, e.g. fp16 weights).
    features, usable = feature_cache(first.encoder, first.model_cfg.backbone, first.preprocess_cfg, records,
                                     Path(args.cache_dir), World(), torch.device("cpu"), num_workers=2)
    if not usable.all():
        raise SystemExit(f"some {args.split} photos are unreadable")
    rows, captions = zip(*[(i, first.vocab.encode(c, 20)) for i, r in enumerate(records) for c in r.captions])
    tokens = pad_tokens(list(captions), first.vocab.pad_id)                 # (N, T)
    targets = tokens[:, 1:]
    real = targets != first.vocab.pad_id
    feats = torch.from_numpy(np.asarray(features[list(rows)], dtype=np.float32))
    word_logprobs = []
    with torch.inference_mode():
        for path, member in zip(args.members, members):
            decoder = member.decoders[0].eval()
            chunks = [torch.log_softmax(decoder(f, t[:, :-1]).float(), -1).gather(2, y[..., None])[..., 0]
                      for f, t, y in zip(feats.split(500), tokens.split(500), targets.split(500))]
            word_logprobs.append(torch.cat(chunks))                           # (N, T - 1)
            print(f"{Path(path).parent.name if Path(path).name == 'best' else Path(path).stem:>24s}  "
                  f"NLL per word {-word_logprobs[-1][real].mean():.4f}")
        mean_nll = np.mean([-lp[real].mean().item() for lp in word_logprobs])
        averaged = torch.logsumexp(torch.stack(word_logprobs), 0) - np.log(len(word_logprobs))
        print(f"{'members mean':>24s}  NLL per word {mean_nll:.4f}")
        print(f"{'ensemble':>24s}  NLL per word {-averaged[real].mean():.4f}   "
              f"({len(records)} {args.split} photos, {int(real.sum())} words)")


if __name__ == "__main__":
    main()
