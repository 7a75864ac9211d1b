"""Batch captioning speed: the batch CLI against the Python API on the same photos, in one run.

Both run the one inference engine (captioner/engine.py), so they should be equally fast. On the same
Flickr8k test photos (default: the first 200), repeated and interleaved so background load hits
every variant alike, it times (medians):

  (b) `captioner caption FOLDER -o OUT.jsonl` through cli.main (the real code path: checkpoint
      check, model load, image workers, ONNX Runtime, decoding, rows written)
  (c) the Python API: `Captioner.load(ckpt).caption(paths)`: the same work (model load included)
  (c') the API call alone on an already loaded model

for greedy and beam 3, and checks the target of issue 10: (c) >= 0.9 x (b) images/s. It also checks
that both gave the same captions.

    .venv/bin/python benchmarks/bench_caption.py [--images 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captioner.api import Captioner, default_checkpoint  # noqa: E402
from captioner.cli import main as cli_main  # noqa: E402
from captioner.datasets import load_flickr8k  # noqa: E402
from captioner.fast_encoder import cpu_count  # noqa: E402

TARGET_RATIO = 0.9
FLICKR8K = str(ROOT.parent / "shared" / "data" / "flickr8k")


def test_records(data_root: str) -> list:
    """The Flickr8k test split's records (its 5 captionless lines' warning silenced), or exit
    naming --data-root."""
    if not Path(data_root).is_dir():
        sys.exit(f"no Flickr8k at {data_root} (--data-root)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_flickr8k(data_root, "test")


def machine() -> str:
    import onnxruntime

    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {cpu_count()} cores | Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__} | load average at start: {load}")


def run_cli(folder: Path, checkpoint: str, batch_size: int, method: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        args = ["caption", str(folder), "-o", str(out), "--checkpoint", checkpoint, "--batch-size",
                str(batch_size), "--method", method, "--beam-size", "3", "--quiet"]
        with contextlib.redirect_stderr(io.StringIO()):
            assert cli_main(args) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {Path(row["image"]).name: row["caption"] for row in rows}


def run_api(captioner: Captioner | None, paths: list[str], checkpoint: str, batch_size: int,
            method: str) -> dict[str, str]:
    captioner = captioner or Captioner.load(checkpoint)
    captions = captioner.caption(paths, method=method, beam_size=3, batch_size=batch_size)
    return {Path(p).name: c.text for p, c in zip(paths, captions)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=FLICKR8K)
    parser.add_argument("--checkpoint", default=str(default_checkpoint()))
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    records = test_records(args.data_root)[: args.images]
    print(machine())
    print(f"checkpoint: {args.checkpoint}")
    loaded = Captioner.load(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"      # the CLI gets a folder holding exactly these photos
        folder.mkdir()
        for record in records:
            (folder / Path(record.path).name).symlink_to(os.path.abspath(record.path))
        paths = sorted(str(p) for p in folder.iterdir())
        n, bs = len(paths), args.batch_size
        cases = {}
        for method in ("greedy", "beam"):
            label = "greedy" if method == "greedy" else "beam 3"
            cases[f"(b) captioner caption, {label}"] = lambda m=method: run_cli(folder, args.checkpoint, bs, m)
            cases[f"(c) API load + caption(paths), {label}"] = lambda m=method: run_api(None, paths, args.checkpoint, bs, m)
            cases[f"(c') API caption(paths), model loaded, {label}"] = lambda m=method: run_api(loaded, paths, args.checkpoint, bs, m)
        for fn in list(cases.values())[:2]:      # warm-up: file cache, ONNX export, first-call setup
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        captions: dict[str, dict[str, str]] = {}
        for repeat in range(args.repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                captions[name] = fn()
                times[name].append(time.perf_counter() - start)
                print(f"  repeat {repeat + 1}: {name}: {n / times[name][-1]:.1f} images/s", file=sys.stderr)
    rate = {name: n / statistics.median(t) for name, t in times.items()}
    print(f"\n{n} Flickr8k test images, batch size {bs}, median of {args.repeats}:")
    width = max(map(len, rate))
    for name, r in rate.items():
        runs = ", ".join(f"{n / t:.1f}" for t in times[name])
        print(f"  {name:<{width}}  {statistics.median(times[name]):6.2f} s  {r:7.1f} images/s   (runs: {runs})")
    ok = True
    print(f"\ntarget (issue 10): API images/s >= {TARGET_RATIO} x the CLI's, the same captions")
    for label in ("greedy", "beam 3"):
        cli, api = f"(b) captioner caption, {label}", f"(c) API load + caption(paths), {label}"
        ratio = rate[api] / rate[cli]
        same = captions[cli] == captions[api] == captions[f"(c') API caption(paths), model loaded, {label}"]
        ok &= ratio >= TARGET_RATIO and same
        print(f"  {label:7} API / CLI = {ratio:.2f}  {'ok' if ratio >= TARGET_RATIO else 'MISSED'};  "
              f"captions identical: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
