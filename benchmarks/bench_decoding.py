"""Decoding one photo: the stacked step (model.DecoderStack, what Captioner decodes with) against the
reference step (each decoder's own CaptionDecoder.step, averaged the same way), side by side in
one process on the same photos' features, for the shipped model and a 3-decoder ensemble of it.

Both must give the same hypotheses (tokens, log-probs) for every photo: checked on every call.
Timings alternate between the two paths photo by photo, so a busy machine slows both alike;
what to quote is the ratio (stacked / reference, median of the per-photo ratios), not the
absolute times of a shared machine.

    .venv/bin/python benchmarks/bench_decoding.py [--photos 30] [--rounds 3] [--decoders 1 3] [--flickr8k DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captioner.api import MIN_DECODE_ROWS, Captioner, decode_batch, default_checkpoint, pad_rows  # noqa: E402
from captioner.ensemble import ensemble_of  # noqa: E402
from captioner.webapp import example_images  # noqa: E402

FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"      # dev photos when present, else examples/


def reference_stepper(captioner: Captioner):
    """Captioner.step written with each decoder's CaptionDecoder.step: the state is the members'
    (h, c) in turn, (N, L, H) each."""
    banned = torch.tensor([captioner.vocab.pad_id, captioner.vocab.bos_id, captioner.vocab.unk_id])

    def step(tokens, state):
        rows = tokens.shape[0]
        if rows < MIN_DECODE_ROWS:
            logprobs, new_state = step(pad_rows(tokens, MIN_DECODE_ROWS),
                                       tuple(pad_rows(s, MIN_DECODE_ROWS) for s in state))
            return logprobs[:rows], tuple(s[:rows] for s in new_state)
        each, new_state = [], []
        for i, decoder in enumerate(captioner.decoders):
            logprobs, (h, c) = decoder.step(tokens, state[2 * i:2 * i + 2])
            each.append(logprobs)
            new_state += [h, c]
        logprobs = torch.logsumexp(torch.stack(each), 0) if len(each) > 1 else each[0]
        return torch.log_softmax(logprobs.index_fill(1, banned, float("-inf")), -1), tuple(new_state)

    def start(features):
        padded = pad_rows(features, MIN_DECODE_ROWS)
        return tuple(s[:features.shape[0]] for d in captioner.decoders for s in d.start_state(padded))

    return step, start


def decode(captioner: Captioner, features: torch.Tensor, reference: bool):
    cfg = captioner.decode_config(method="beam", beam_size=3, n_best=3)    # the web UI's default
    with torch.inference_mode():
        if reference:
            step, start = reference_stepper(captioner)
            state = start(features)
        else:
            step, state = captioner.stepper(), captioner.start_state(features)
        return decode_batch(step, state, cfg, captioner.vocab.bos_id, captioner.vocab.eos_id)


def photos(count: int, flickr8k: Path) -> list[str]:
    dev = flickr8k / "Flickr_8k.devImages.txt"
    if dev.is_file():
        return [str(flickr8k / "Images" / name) for name in dev.read_text().split()[:count]]
    return example_images()[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(default_checkpoint()))
    parser.add_argument("--photos", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decoders", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--flickr8k", type=Path, default=FLICKR8K, help="its dev photos are used when present")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                     # as the server and the engine decode
    base = Captioner.load(args.checkpoint)
    paths = photos(args.photos, args.flickr8k)
    features = base.encode(torch.stack([base.preprocess(p) for p in paths]))      # (P, D)
    print(f"{len(paths)} photos, beam 3, 3 best, one photo per call, {args.rounds} rounds; "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for count in args.decoders:
        captioner = base if count == 1 else ensemble_of(
            [Captioner.load(args.checkpoint, fast=False) for _ in range(count)],
            [f"copy {i}" for i in range(count)]).eval()
        decode(captioner, features[:1], True), decode(captioner, features[:1], False)   # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        ratios = []
        for round_ in range(args.rounds):
            for i in range(len(paths)):
                row = features[i:i + 1]
                spent, results = {}, {}
                for reference in ((True, False) if (i + round_) % 2 == 0 else (False, True)):
                    start = time.perf_counter()
                    results[reference] = decode(captioner, row, reference)
                    spent[reference] = time.perf_counter() - start
                    times[reference].append(spent[reference])
                same = [[(h.tokens, h.logprob) for h in hyps[0]] for hyps in results.values()]
                if same[0] != same[1]:
                    raise SystemExit(f"{paths[i]}: the stacked step decoded differently")
                ratios.append(spent[False] / spent[True])
        quartiles = statistics.quantiles(ratios, n=4)
        print(f"{count} decoder(s): reference median {1000 * statistics.median(times[True]):.1f} ms, "
              f"stacked {1000 * statistics.median(times[False]):.1f} ms a photo; stacked/reference "
              f"{statistics.median(ratios):.2f} (quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}, "
              f"n={len(ratios)}); hypotheses identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
