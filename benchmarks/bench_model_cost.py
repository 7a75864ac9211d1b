"""What a new model costs in speed against the old one, measured side by side in one run.

Issue 9's bounds for a better model: one photo through the Python API (encode + beam 3) at most
2x the old model's time, and batch CLI greedy throughput at least 0.6x the old model's. Both models
run the same code (this checkout); the runs alternate between them so background load hits both alike.

  (a) one photo, API: `captioner.caption(photo, method="beam", beam_size=3)` on a loaded model, each
      of --photos Flickr8k test photos in turn; median latency per photo;
  (b) batch CLI, greedy: `captioner caption FOLDER -o OUT.jsonl` on --images test photos (model load
      included); median images/s.

    .venv/bin/python benchmarks/bench_model_cost.py --old OLD.safetensors --new checkpoints/model.safetensors
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_caption import FLICKR8K, machine, run_cli, test_records  # noqa: E402
from captioner.api import Captioner, default_checkpoint  # noqa: E402

MAX_SLOWDOWN_ONE_PHOTO = 2.0
MIN_BATCH_THROUGHPUT = 0.6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the model to compare against")
    parser.add_argument("--new", default=str(default_checkpoint()))
    parser.add_argument("--data-root", default=FLICKR8K)
    parser.add_argument("--photos", type=int, default=30, help="photos for the one-photo latency")
    parser.add_argument("--images", type=int, default=200, help="photos for the batch CLI")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    records = test_records(args.data_root)
    print(machine())
    models = {"old": args.old, "new": args.new}
    for name, path in models.items():
        print(f"{name}: {path}")
    loaded = {name: Captioner.load(path) for name, path in models.items()}
    for name, model in loaded.items():
        print(f"  {name}: {len(model.decoders)} decoder(s), decoding {model.decode_cfg}")

    photos = [r.path for r in records[: args.photos]]
    latency: dict[str, list[float]] = {name: [] for name in models}
    for model in loaded.values():                         # warm-up: ONNX session, first-call setup
        model.caption(photos[0], method="beam", beam_size=3)
    for _ in range(args.repeats):
        for photo in photos:
            for name, model in loaded.items():
                start = time.perf_counter()
                model.caption(photo, method="beam", beam_size=3)
                latency[name].append(time.perf_counter() - start)

    throughput: dict[str, list[float]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for record in records[: args.images]:
            (folder / Path(record.path).name).symlink_to(os.path.abspath(record.path))
        n = len(list(folder.iterdir()))
        for path in models.values():                      # warm-up: file cache, ONNX export
            run_cli(folder, path, 32, "greedy")
        for _ in range(args.repeats):
            for name, path in models.items():
                start = time.perf_counter()
                run_cli(folder, path, 32, "greedy")
                throughput[name].append(n / (time.perf_counter() - start))

    one = {name: statistics.median(t) * 1000 for name, t in latency.items()}
    batch = {name: statistics.median(r) for name, r in throughput.items()}
    slowdown, kept = one["new"] / one["old"], batch["new"] / batch["old"]
    print(f"\n(a) one photo through the API, beam 3: median of {len(photos)} photos x {args.repeats}")
    for name in models:
        print(f"  {name}: {one[name]:6.1f} ms")
    print(f"  new / old = {slowdown:.2f} (bound <= {MAX_SLOWDOWN_ONE_PHOTO}) "
          f"{'ok' if slowdown <= MAX_SLOWDOWN_ONE_PHOTO else 'MISSED'}")
    print(f"(b) batch CLI, greedy, {n} photos, model load included: median of {args.repeats}")
    for name in models:
        runs = ", ".join(f"{r:.1f}" for r in throughput[name])
        print(f"  {name}: {batch[name]:6.1f} images/s  (runs: {runs})")
    print(f"  new / old = {kept:.2f} (bound >= {MIN_BATCH_THROUGHPUT}) "
          f"{'ok' if kept >= MIN_BATCH_THROUGHPUT else 'MISSED'}")
    return 0 if slowdown <= MAX_SLOWDOWN_ONE_PHOTO and kept >= MIN_BATCH_THROUGHPUT else 1


if __name__ == "__main__":
    sys.exit(main())
