"""Choose the shipped ensemble and its decoding settings on the dev split only, then write it.

    python scripts/select_members.py --data-root ../shared/data/flickr8k --cache-dir runs/flickr8k/cache \
        --output checkpoints/model.safetensors --report runs/flickr8k/selection.json \
        runs/flickr8k/base/best runs/flickr8k/sampling/best runs/flickr8k/smoothing/best runs/flickr8k/tied/best

1. every member alone, beam 3 (length penalty 0.5, the previous default);
2. forward selection: start from the best member, add the member that raises the dev objective
   most, stop when none does;
3. for that ensemble: length penalty x n-gram blocking at beam 3 (the default `captioner caption`
   path), and, as ablation rows only, beam 5 and test-time flip averaging of the features;
4. writes the ensemble (fp16) with the chosen decoding defaults, and every row to --report.

The objective is the mean of BLEU-4 / 0.215, METEOR / 0.203 and CIDEr / 0.52 (the project's bar),
so no one metric is bought with another. Features come from the training feature cache (dev photos;
the mirrored dev photos are encoded once here for the flip row). Scores are coco-caption's
(pycocoevalcap), as `captioner evaluate` computes them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from captioner import Captioner
from captioner.config import DecodeConfig
from captioner.datasets import load_flickr8k
from captioner.distributed import World
from captioner.ensemble import ensemble_of
from captioner.evaluate import score_captions
from captioner.features import feature_cache

BAR = {"BLEU-4": 0.215, "METEOR": 0.203, "CIDEr": 0.52}
LENGTH_PENALTIES = (0.3, 0.5, 0.7, 1.0)
NGRAM_BLOCKING = (0, 2, 3)


def objective(scores: dict[str, float]) -> float:
    return float(np.mean([scores[k] / v for k, v in BAR.items()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("members", nargs="+", help="checkpoints (run folders' best/), one per decoder")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--output", required=True, help="where the chosen ensemble is written (fp16)")
    parser.add_argument("--report", required=True, help="JSON file: every row scored, and the choice")
    parser.add_argument("--images", type=int, default=0, help="only the first N images (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    names = [Path(p).parent.name if Path(p).name == "best" else Path(p).stem for p in args.members]
    members = {name: Captioner.load(p, fast=False) for name, p in zip(names, args.members)}
    first = members[names[0]]
    records = load_flickr8k(args.data_root, args.split)
    records = records[: args.images] if args.images else records
    # The training feature cache, as training keys it (the first member's CNN); encoded here
    # only when it misses (training cached the dev photos, not their mirror images).
    features_of = partial(feature_cache, first.encoder, first.model_cfg.backbone, first.preprocess_cfg, records,
                          Path(args.cache_dir), World(), torch.device("cpu"), num_workers=2)
    features, usable = features_of()
    rows = [i for i in range(len(records)) if usable[i]]
    refs = {records[i].image_id: records[i].captions for i in rows}
    feats = torch.from_numpy(np.asarray(features[rows], dtype=np.float32))        # (N, D)

    report: dict = {"split": args.split, "images": len(rows), "bar": BAR, "rows": []}

    def score(label: str, names_in: list[str], cfg: DecodeConfig, inputs: torch.Tensor = feats) -> float:
        model = ensemble_of([members[n] for n in names_in], names_in)
        started = time.time()
        captions = model.caption_features(inputs, cfg)
        seconds = time.time() - started
        scores = score_captions(refs, {records[i].image_id: c.text for i, c in zip(rows, captions)})
        row = {"label": label, "members": names_in, "decode": dataclasses.asdict(cfg),
               "scores": {k: round(v, 4) for k, v in scores.items()}, "objective": round(objective(scores), 4),
               "decode_seconds": round(seconds, 1), "mean_words": round(float(np.mean([len(c.words) for c in captions])), 2)}
        report["rows"].append(row)
        Path(args.report).write_text(json.dumps(report, indent=1))
        print(f"{label:44s} " + " ".join(f"{k} {scores[k]:.4f}" for k in ("BLEU-4", "METEOR", "CIDEr"))
              + f"  objective {row['objective']:.4f}  {seconds:.0f}s", flush=True)
        return row["objective"]

    beam3 = DecodeConfig(method="beam", beam_size=3, length_penalty=0.5)
    alone = {n: score(f"{n} alone, beam 3 lp 0.5", [n], beam3) for n in names}
    chosen = [max(alone, key=alone.get)]
    best = alone[chosen[0]]
    while len(chosen) < len(names):
        trials = {n: score(f"{' + '.join(chosen + [n])}, beam 3 lp 0.5", chosen + [n], beam3)
                  for n in names if n not in chosen}
        candidate = max(trials, key=trials.get)
        if trials[candidate] <= best:
            break
        chosen.append(candidate)
        best = trials[candidate]

    best_cfg = beam3
    label = " + ".join(chosen)          # one decoder or an ensemble: rows name what they decode with
    for alpha in LENGTH_PENALTIES:
        for ngram in NGRAM_BLOCKING:
            cfg = dataclasses.replace(beam3, length_penalty=alpha, no_repeat_ngram_size=ngram)
            if cfg == beam3:
                continue      # scored during the selection
            value = score(f"{label}, beam 3 lp {alpha} no-repeat {ngram}", chosen, cfg)
            if value > best:
                best, best_cfg = value, cfg
    # Ablation rows only: the default stays beam 3 (the path the quality bar is measured on) and
    # flip averaging doubles the CNN's cost.
    score(f"{label}, beam 5 (ablation)", chosen, dataclasses.replace(best_cfg, beam_size=5))
    mirrored, mirrored_usable = features_of(flipped=True)
    if mirrored_usable[rows].all():
        averaged = (feats + torch.from_numpy(np.asarray(mirrored[rows], dtype=np.float32))) / 2
        score(f"{label}, flip-averaged features (ablation)", chosen, best_cfg, averaged)

    report["chosen"] = {"members": chosen, "decode": dataclasses.asdict(best_cfg), "objective": best}
    Path(args.report).write_text(json.dumps(report, indent=1))
    ensemble = ensemble_of([members[n] for n in chosen], chosen,
                           {"ensemble_of": chosen, "chosen_on": f"flickr8k {args.split}"})
    ensemble.decode_cfg = dataclasses.replace(ensemble.decode_cfg, **{
        k: v for k, v in dataclasses.asdict(best_cfg).items()
        if k in ("method", "beam_size", "length_penalty", "no_repeat_ngram_size")})
    print(f"chose {chosen} with {best_cfg}: wrote {ensemble.save(args.output, half=True)}")


if __name__ == "__main__":
    main()
