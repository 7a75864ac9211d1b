"""Where captioning time goes on this machine, and whether the batch CLI meets its targets.

On the same Flickr8k test photos (default: the first 500) and batch size it measures, repeated and
interleaved so background load hits every variant alike, and prints medians:

  (a) encoder only: read + preprocess (DataLoader workers) + ONNX Runtime CNN, arranged as the
      CLI runs it -- the ceiling; (a') the same with one batch at a time on all cores
  (b) the full `captioner caption` pipeline (cli.main, the real code path), greedy and beam 3
  (c) the Python API called once per image in a loop
  (d) the eager-PyTorch encoder for reference (contiguous and channels-last)
  (e) decoding alone on precomputed features: fp32 vs int8 dynamic quantization, 1 vs all threads

Targets (issue 4): (b greedy) >= 100 images/s and >= 0.85 x (a); beam 3 >= 0.6 x greedy;
(b) >= 3 x (c).

--compare N captions the first N test images (default 1000) with eager PyTorch, the ONNX Runtime
encoder and the int8 decoder, and reports identical captions and Flickr8k CIDEr for each.

    .venv/bin/python benchmarks/bench_caption.py --checkpoint checkpoints/model.safetensors
    .venv/bin/python benchmarks/bench_caption.py --compare 1000
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captioner import batch  # noqa: E402
from captioner.api import Captioner, default_checkpoint  # noqa: E402
from captioner.cli import main as cli_main  # noqa: E402
from captioner.datasets import load_flickr8k  # noqa: E402
from captioner.fast_encoder import cpu_count  # noqa: E402


def machine() -> str:
    import onnxruntime

    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    # Other jobs may share the cores: the scheduling priority says how much of them we got.
    group = "n/a"
    with contextlib.suppress(OSError):
        group = Path("/proc/self/autogroup").read_text().split()[-1]
    return (f"{model}, {cpu_count()} cores | Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}\nload average at start: {load} | "
            f"nice {os.nice(0)}, autogroup nice {group}")


def loader(paths, captioner, batch_size, workers):
    candidates = [batch.Candidate(p, True) for p in paths]
    return DataLoader(batch.CandidateImages(candidates, captioner.preprocess_cfg), batch_size=batch_size,
                      num_workers=workers, collate_fn=batch.collate, prefetch_factor=2 if workers else None)


def encode_all(paths, captioner, encode, batch_size, workers, threads) -> torch.Tensor:
    """Read + preprocess in workers and run `encode` on each batch; features (N, D)."""
    features = []
    with batch.torch_threads(threads), torch.inference_mode():
        for _, images, errors, _ in loader(paths, captioner, batch_size, workers):
            assert not errors, errors
            features.append(encode(images))
    return torch.cat(features)


def encoder_only(paths, captioner, batch_size, workers) -> None:
    """(a): the CLI's reading and encoding (one single-threaded ONNX Runtime batch per core)."""
    batches = iter(loader(paths, captioner, batch_size, workers))
    for _ in batch.encode_ahead(batches, lambda b: captioner.encode(b[1]), cpu_count()):
        pass


def cli_model(checkpoint) -> Captioner:
    """The model as `captioner caption` runs it: single-threaded ONNX Runtime, int8 decoders."""
    return batch.load_captioner(Path(checkpoint), argparse.Namespace(device="cpu", no_fast=False, no_int8=False))


def channels_last(encoder):
    fast = copy.deepcopy(encoder).to(memory_format=torch.channels_last)

    def encode(images):
        return fast(images.contiguous(memory_format=torch.channels_last)).float()
    return encode


def decode_all(captioner, features, method, batch_size, threads) -> list[str]:
    cfg = captioner.decode_config(method=method, beam_size=3)
    texts = []
    with batch.torch_threads(threads):
        for start in range(0, len(features), batch_size):
            texts += [c.text for c in captioner.caption_features(features[start:start + batch_size], cfg)]
    return texts


def run_cli(folder, checkpoint, batch_size, method, workers) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["caption", str(folder), "-o", f"{tmp}/out.jsonl", "--checkpoint", str(checkpoint),
                "--batch-size", str(batch_size), "--method", method, "--beam-size", "3", "--quiet"]
        if workers is not None:
            args += ["--workers", str(workers)]
        with contextlib.redirect_stderr(io.StringIO()):
            assert cli_main(args) == 0
        lines = Path(f"{tmp}/out.jsonl").read_text().splitlines()
        assert len(lines) == len(list(Path(folder).iterdir())), "the CLI skipped images"


def api_loop(captioner, paths, threads) -> None:
    with batch.torch_threads(threads):
        for path in paths:
            captioner.caption(path, method="greedy")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def benchmark(args, paths, folder) -> None:
    n, bs, cores = len(paths), args.batch_size, cpu_count()
    workers = args.workers if args.workers is not None else min(cores, 4)
    cli = cli_model(args.checkpoint)
    api = Captioner.load(args.checkpoint)          # ONNX Runtime on all cores, fp32 decoders
    eager = Captioner.load(args.checkpoint, fast=False)
    assert cli.fast_encoder is not None and api.fast_encoder is not None, "ONNX Runtime is unavailable"
    features = encode_all(paths, api, api.encode, bs, workers, 1)

    cases = {
        "model load, part of every (b) run": lambda: cli_model(args.checkpoint),
        "(a) encoder only: read + preprocess + ONNX Runtime CNN": lambda: encoder_only(paths, cli, bs, workers),
        "(a') the same, one batch at a time on all cores": lambda: encode_all(paths, api, api.encode, bs, workers, 1),
        "(b) captioner caption, greedy": lambda: run_cli(folder, args.checkpoint, bs, "greedy", args.workers),
        "(b) captioner caption, beam 3": lambda: run_cli(folder, args.checkpoint, bs, "beam", args.workers),
        f"(c) API, one image per call, torch {torch.get_num_threads()} threads (default)":
            lambda: api_loop(api, paths, torch.get_num_threads()),
        "(c) API, one image per call, torch 1 thread": lambda: api_loop(api, paths, 1),
        f"(d) eager PyTorch encoder, {cores} threads":
            lambda: encode_all(paths, eager, eager.encode, bs, workers, cores),
        f"(d) eager PyTorch encoder, channels-last, {cores} threads":
            lambda: encode_all(paths, eager, channels_last(eager.encoder), bs, workers, cores),
    }
    for method in ("greedy", "beam"):
        for name, model in (("fp32", api), ("int8", cli)):
            for threads in sorted({1, cores}):
                label = f"(e) decode only, {method if method == 'greedy' else 'beam 3'}, {name}, {threads} thread(s)"
                cases[label] = (lambda m=model, me=method, t=threads: decode_all(m, features, me, bs, t))
    times = {name: [] for name in cases}
    for repeat in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
            print(f"  repeat {repeat + 1}: {name}: {n / times[name][-1]:.1f} images/s", file=sys.stderr)

    rate = {name: n / statistics.median(t) for name, t in times.items()}
    print(f"\n{n} Flickr8k test images, batch size {bs}, {workers} image workers, median of {args.repeats}:")
    width = max(map(len, rate))
    for name, r in rate.items():
        spread = ", ".join(f"{n / t:.0f}" for t in times[name])
        print(f"  {name:<{width}}  {statistics.median(times[name]):6.2f} s  {r:7.1f} images/s   (runs: {spread})")

    a = rate["(a) encoder only: read + preprocess + ONNX Runtime CNN"]
    greedy, beam = rate["(b) captioner caption, greedy"], rate["(b) captioner caption, beam 3"]
    api = max(r for name, r in rate.items() if name.startswith("(c)"))
    print("\ntargets (issue 4):")
    for label, value, target in [("(b greedy) images/s", greedy, 100.0),
                                 ("(b greedy) / (a)", greedy / a, 0.85),
                                 ("(b beam 3) / (b greedy)", beam / greedy, 0.6),
                                 ("(b greedy) / (c, the faster)", greedy / api, 3.0)]:
        print(f"  {label:<30} {value:8.2f}  (target >= {target:g})  {'ok' if value >= target else 'MISSED'}")
    if args.subprocess:
        command = [sys.executable, "-m", "captioner", "caption", str(folder), "-o", "/dev/null",
                   "--checkpoint", str(args.checkpoint), "--batch-size", str(bs), "--method", "greedy", "--quiet"]
        seconds = timed(lambda: subprocess.run(command, cwd=ROOT, check=False))
        print(f"\none fresh `captioner caption` process (interpreter start, imports, model load, "
              f"{n} images, greedy): {seconds:.1f} s = {n / seconds:.1f} images/s")


def compare(args, records) -> None:
    """Captions and CIDEr of the fast paths against eager PyTorch on the same images."""
    from captioner.evaluate import score_captions

    paths = [r.path for r in records]
    references = {r.image_id: r.captions for r in records}
    fast, cli = Captioner.load(args.checkpoint), cli_model(args.checkpoint)
    eager = Captioner.load(args.checkpoint, fast=False)
    workers, bs = min(cpu_count(), 4), args.batch_size
    eager_features = encode_all(paths, eager, eager.encode, bs, workers, cpu_count())
    fast_features = encode_all(paths, fast, fast.encode, bs, workers, 1)
    print(f"\n{len(paths)} Flickr8k test images: max |ONNX - eager| feature difference "
          f"{(fast_features - eager_features).abs().max():.2e}")
    variants = {"eager PyTorch (reference)": (eager, eager_features),
                "ONNX Runtime encoder": (fast, fast_features),
                "ONNX Runtime encoder + int8 decoder": (cli, fast_features)}
    for method in ("greedy", "beam"):
        reference = None
        for name, (model, feats) in variants.items():
            texts = decode_all(model, feats, method, bs, 1)
            reference = reference or texts
            same = sum(a == b for a, b in zip(texts, reference))
            with contextlib.redirect_stderr(io.StringIO()):
                cider = score_captions(references, dict(zip(references, texts)), metrics=("CIDEr",))["CIDEr"]
            print(f"  {method if method == 'greedy' else 'beam 3':6}  {name:<36} CIDEr {cider:.4f}   "
                  f"identical to eager: {same}/{len(texts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    parser.add_argument("--checkpoint", default=str(default_checkpoint()))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="image workers (default: the CLI's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subprocess", action="store_true", help="also time one fresh CLI process")
    parser.add_argument("--compare", type=int, metavar="N", help="compare captions and CIDEr on N test images")
    args = parser.parse_args()
    if not Path(args.data_root).is_dir():
        sys.exit(f"no Flickr8k at {args.data_root} (--data-root)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = load_flickr8k(args.data_root, "test")
    print(machine())
    print(f"checkpoint: {args.checkpoint}")
    if args.compare:
        compare(args, records[: args.compare])
        return
    paths = [r.path for r in records[: args.images]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"      # the CLI gets a folder holding exactly these photos
        folder.mkdir()
        for path in paths:
            (folder / Path(path).name).symlink_to(os.path.abspath(path))
        benchmark(args, paths, folder)


if __name__ == "__main__":
    main()
