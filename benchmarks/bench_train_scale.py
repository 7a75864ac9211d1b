"""Training at COCO scale, measured on a synthetic COCO-sized set: how the cost of `captioner train`
(frozen CNN, cached features) grows with the number of training images, for one process and for
torchrun with 2 processes.

The set needs no photos. In WORKDIR (built once, reused when it matches the options):

  images/train2017/, images/val2017/   empty placeholder files named as in COCO 2017 (<id:012d>.jpg):
                                       load_coco keeps only records whose image file exists
                                       (keep_existing); nothing opens them, because their features
                                       are cached, and an empty file is "not an image" to
                                       read_image, so a cache miss fails loudly instead of quietly
                                       timing the CNN
  n<N>/annotations/captions_train2017.json, captions_val2017.json
                                       COCO caption JSON: the first N images, 5 captions each,
                                       7 + Poisson(3.5) words (mean 10.5, as COCO's), drawn from a
                                       Zipf law (s = 1) over --vocab-words pseudo-words
  n<N>/train2017, n<N>/val2017         links to images/...
  cache/                               the feature cache entries `captioner train` looks up for
                                       these records (random fp16 features, N x 1280), named by the
                                       package's own cache_key/cache_files over the records that
                                       training_records gives and the CNN's weights, as `captioner
                                       prepare` names them (written again when the key changes)

For each size and process count, a fresh process (or torchrun with 2) runs the real Trainer on
that set (`--dataset coco --train-split train2017 --val-split val2017`, batch 128, the default
512-unit decoder), takes --warmup steps, then times --steps steps. Reported per row:

  records / vocabulary / tokens   seconds in load_split (train + val: COCO JSON through
                                  pycocotools), Vocabulary.build and CaptionTokens, timed by
                                  wrapping the functions the trainer calls (the only change to
                                  its code path)
  first batch                     seconds from launching the command to the first training batch
                                  in hand (slowest rank): imports, records, vocabulary, model,
                                  cache lookup, tokens, DDP set-up
  steps/s, samples/s              the timed steps (global batch; loading included)
  loader ms/step                  of each step, the time spent getting the batch (sampler, cache
                                  rows, padding): what a GPU would still wait for
  epoch min (extrapolated)        steps per epoch / steps/s: training steps only (no validation,
                                  no checkpoints), NOT a measured epoch
  peak RSS MB                     VmHWM of each rank (the largest); RssAnon at the end beside it
                                  (private memory: what grows with the data if anything does;
                                  RSS also counts cache pages read through the memory map, which
                                  are shared page cache)

    .venv/bin/python benchmarks/bench_train_scale.py [--sizes 10000,40000,113287] [--steps 60]
        [--warmup 10] [--processes 1,2] [--threads 1] [--workdir DIR] [--json OUT.json]
        [--build-only] [--quick]

--quick is a smoke test (tiny sizes, a few steps, seconds): it checks the benchmark runs, its
timings mean nothing. Speed figures need a quiet machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAIN_SPLIT, VAL_SPLIT = "train2017", "val2017"
FEATURE_ROWS_PER_CHUNK = 8192
QUICK = dict(sizes="300,600", val_images=40, steps=3, warmup=1, batch_size=16, vocab_words=500)


# ---------------------------------------------------------------------------------------------
# The synthetic set
def pseudo_words(count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct lower-case words, shortest first (frequent words are short, as in English):
    consonant-vowel syllables, never one of the words the Treebank tokenizer splits ("cannot")."""
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    open_syllables = [c + v for c in consonants for v in vowels]                   # "ka"
    closed = [s + c for s in open_syllables for c in consonants]                   # "kat"
    words, seen = [], set()
    for group in (open_syllables, closed, [a + b for a in open_syllables for b in closed]):
        for word in rng.permutation(group):
            if len(words) == count:
                return words
            if word not in seen:
                seen.add(word)
                words.append(str(word))
    raise ValueError(f"--vocab-words {count}: at most {len(words)} pseudo-words")


def synthetic_captions(count: int, vocabulary: list[str], rng: np.random.Generator) -> list[str]:
    """COCO-like captions: 7 + Poisson(3.5) words, Zipf-distributed (s = 1), capitalised, a final
    period on about half of them and a comma in one in ten."""
    lengths = np.minimum(7 + rng.poisson(3.5, count), 50)
    ranks = np.arange(1, len(vocabulary) + 1)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()
    word_ids = rng.choice(len(vocabulary), size=int(lengths.sum()), p=zipf)
    words = np.array(vocabulary, dtype=object)[word_ids]
    period, comma = rng.random(count) < 0.5, rng.random(count) < 0.1
    captions, start = [], 0
    for i, length in enumerate(lengths):
        caption = words[start:start + length].tolist()
        start += length
        if comma[i]:
            caption[length // 2] += ","
        text = " ".join(caption)
        captions.append(text[0].upper() + text[1:] + ("." if period[i] else ""))
    return captions


def coco_json(image_ids: np.ndarray, captions: list[str], per_image: int) -> dict:
    images = [{"id": int(i), "file_name": f"{int(i):012d}.jpg", "width": 640, "height": 480}
              for i in image_ids]
    annotations = [{"id": k + 1, "image_id": int(image_ids[k // per_image]), "caption": caption}
                   for k, caption in enumerate(captions)]
    return {"info": {"description": "synthetic COCO-sized caption set (benchmarks/bench_train_scale.py)"},
            "licenses": [], "images": images, "annotations": annotations}


def build_set(workdir: Path, sizes: list[int], val_images: int, vocab_words: int, seed: int = 0
              ) -> None:
    """Placeholders and caption JSON per size (skipped when WORKDIR already holds them, built with
    the same options for these sizes or more), then the feature cache entries the trainer would
    look up now, where missing (a new key after a change to the package builds new ones)."""
    stamp = workdir / "built.json"
    wanted = {"val_images": val_images, "vocab_words": vocab_words, "seed": seed}
    built = json.loads(stamp.read_text()) if stamp.is_file() else {"sizes": []}
    if not (set(sizes) <= set(built.pop("sizes")) and built == wanted):
        build_captions(workdir, sizes, val_images, vocab_words, seed)
        stamp.write_text(json.dumps({"sizes": sizes, **wanted}))
    started = time.perf_counter()
    written = sum(write_feature_cache(data_root(workdir, n), workdir / "cache", np.random.default_rng([seed, n]))
                  for n in sizes)
    if written:
        print(f"wrote {written} feature cache entries in {workdir} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)


def build_captions(workdir: Path, sizes: list[int], val_images: int, vocab_words: int, seed: int) -> None:
    started = time.perf_counter()
    per_image, rng = 5, np.random.default_rng(seed)
    total = max(sizes) + val_images
    # Sparse ids as in COCO (up to 581,929), in random order: load_coco sorts them.
    ids = rng.choice(np.arange(1, max(600_000, 2 * total)), size=total, replace=False)
    train_ids, val_ids = ids[: max(sizes)], ids[max(sizes):]
    vocabulary = pseudo_words(vocab_words, rng)
    train_captions = synthetic_captions(len(train_ids) * per_image, vocabulary, rng)
    val_captions = synthetic_captions(len(val_ids) * per_image, vocabulary, rng)
    for split, split_ids in ((TRAIN_SPLIT, train_ids), (VAL_SPLIT, val_ids)):
        folder = workdir / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in split_ids:
            (folder / f"{int(i):012d}.jpg").touch()
    for n in sizes:
        root = data_root(workdir, n)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        for split in (TRAIN_SPLIT, VAL_SPLIT):
            link = root / split
            if not link.exists():
                link.symlink_to(Path("..") / "images" / split, target_is_directory=True)
        write_json(root / "annotations" / f"captions_{TRAIN_SPLIT}.json",
                   coco_json(train_ids[:n], train_captions[: n * per_image], per_image))
        write_json(root / "annotations" / f"captions_{VAL_SPLIT}.json",
                   coco_json(val_ids, val_captions, per_image))
    print(f"wrote the captions of the synthetic set in {workdir} ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)


def data_root(workdir: Path, n: int) -> Path:
    return workdir / f"n{n}"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def write_feature_cache(root: Path, cache_dir: Path, rng: np.random.Generator) -> int:
    """Random fp16 features for the records `captioner train` reads from root, under the name the
    trainer looks up (unless there already): the records come from training_records, the key from
    the package's cache_key over the same backbone, weights and preprocessing as `captioner
    prepare` (prepare_features) uses. Returns the number of entries written."""
    from captioner.config import DataConfig, ModelConfig, TrainConfig
    from captioner.encoder import build_backbone, encoder_digest
    from captioner.features import cache_files, cache_key
    from captioner.train import training_records

    model_cfg = ModelConfig()
    data_cfg = DataConfig(dataset="coco", data_root=str(root), train_split=TRAIN_SPLIT, val_split=VAL_SPLIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, val = training_records(data_cfg, TrainConfig())
    backbone = build_backbone(model_cfg.backbone, pretrained=True)
    weights = encoder_digest(backbone.module)
    written = 0
    for records in (train, val):
        key = cache_key(model_cfg.backbone, backbone.preprocess, [r.path for r in records], weights=weights)
        array_path, done_path = cache_files(cache_dir, key)
        if done_path.is_file():
            continue
        array_path.parent.mkdir(parents=True, exist_ok=True)
        features = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float16,
                                             shape=(len(records), backbone.feature_dim))
        for start in range(0, len(records), FEATURE_ROWS_PER_CHUNK):
            rows = features[start:start + FEATURE_ROWS_PER_CHUNK]
            rows[:] = rng.gamma(1.0, 0.5, size=rows.shape)     # pooled ReLU6 activations: >= 0
        features.flush()
        del features
        done_path.write_text(json.dumps({"ok": [True] * len(records)}))
        written += 1
    return written


# ---------------------------------------------------------------------------------------------
# One measurement: run in a fresh process per rank
def memory_status() -> dict[str, float]:
    """This process's VmHWM (peak RSS), VmRSS, RssAnon and RssFile in MB (Linux /proc)."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                values[name] = round(int(rest.split()[0]) / 1024, 1)
    values.setdefault("VmHWM", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return values


def timed(phases: dict[str, float], name: str, function):
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    return call


def worker(argv: list[str]) -> int:
    """One rank: the Trainer on the synthetic set, warm-up steps, then timed steps; writes
    OUT/rank<R>.json."""
    parser = argparse.ArgumentParser(prog="bench_train_scale.py worker")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    args = parser.parse_args(argv)
    launched = float(os.environ["BENCH_LAUNCHED_AT"])

    import torch

    from captioner import train, train_data
    from captioner.config import DataConfig, ModelConfig, TrainConfig
    from captioner.distributed import init_world
    from captioner.vocab import Vocabulary

    phases: dict[str, float] = {}
    train.load_split = timed(phases, "records_s", train.load_split)
    train_data.CaptionTokens = timed(phases, "tokens_s", train_data.CaptionTokens)
    build = Vocabulary.build.__func__
    Vocabulary.build = classmethod(timed(phases, "vocabulary_s", build))
    memory = {"after imports": memory_status()}

    world = init_world(torch.device("cpu"))
    data_cfg = DataConfig(dataset="coco", data_root=args.data_root, train_split=TRAIN_SPLIT,
                          val_split=VAL_SPLIT)
    train_cfg = TrainConfig(output=str(Path(args.out) / "run"), batch_size=args.batch_size,
                            cache_dir=args.cache_dir, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = train.Trainer(ModelConfig(), data_cfg, train_cfg, world)
    data = trainer.data
    if not isinstance(data.train_features, np.memmap):
        raise RuntimeError("the training features are not memory-mapped from the cache")
    memory["after set-up"] = memory_status()
    needed = args.warmup + args.steps
    if needed > data.steps_per_epoch:
        raise ValueError(f"--warmup + --steps = {needed} steps, but an epoch here has only "
                         f"{data.steps_per_epoch}: use fewer steps or more images")
    batches = iter(trainer.begin_epoch(0))
    loader_s = step_s = 0.0
    for step in range(needed):
        if step == args.warmup:
            world.barrier()
            loader_s = step_s = 0.0
            timed_from = time.perf_counter()
        start = time.perf_counter()
        inputs, tokens = next(batches)[:2]        # (features, token ids[, unreadable])
        fetched = time.perf_counter()
        if step == 0:
            first_batch_s = time.time() - launched
        trainer.train_step(inputs, tokens)
        loader_s += fetched - start
        step_s += time.perf_counter() - fetched
    elapsed = time.perf_counter() - timed_from
    memory["end"] = memory_status()
    result = {
        "rank": world.rank, "world_size": world.size, "threads": torch.get_num_threads(),
        "images": len(trainer.train_records), "val_images": len(trainer.val_records),
        "captions": len(data.tokens), "vocabulary": len(trainer.vocab),
        "steps_per_epoch": data.steps_per_epoch, "timed_steps": args.steps, "seconds": elapsed,
        "loader_s": loader_s, "compute_s": step_s, "first_batch_s": first_batch_s,
        **{k: round(v, 3) for k, v in phases.items()}, "memory_mb": memory,
    }
    Path(args.out, f"rank{world.rank}.json").write_text(json.dumps(result, indent=1))
    world.close()
    return 0


def cache_entries(cache_dir: Path) -> list[str]:
    """The cache's arrays, markers and parts (not its lock files, which every lookup takes)."""
    return sorted(p.name for p in cache_dir.glob("features-*"))


def measure(workdir: Path, n: int, processes: int, args) -> dict:
    """Launch one run (python, or torchrun for several processes) and combine its ranks' reports."""
    out = Path(tempfile.mkdtemp(prefix=f"n{n}-p{processes}-", dir=workdir / "runs"))
    cache_dir = workdir / "cache"
    before = cache_entries(cache_dir)
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"])
    command = launcher + [__file__, "worker", "--data-root", str(data_root(workdir, n)),
                          "--cache-dir", str(cache_dir), "--out", str(out), "--steps", str(args.steps),
                          "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "BENCH_LAUNCHED_AT": repr(time.time())}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{n} images, {processes} process(es): exit {done.returncode}\n{done.stderr[-4000:]}")
    after = cache_entries(cache_dir)
    if after != before:
        raise RuntimeError("the trainer wrote feature cache entries of its own: the synthetic cache "
                           f"is not where it looks ({sorted(set(after) - set(before))})")
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(processes)]
    shutil.rmtree(out, ignore_errors=True)
    slowest = max(r["seconds"] for r in ranks)
    steps_per_s = args.steps / slowest
    first = ranks[0]
    return {
        "images": first["images"], "captions": first["captions"], "vocabulary": first["vocabulary"],
        "processes": processes, "threads_per_process": first["threads"], "batch_size": args.batch_size,
        "records_s": max(r.get("records_s", 0) for r in ranks),
        "vocabulary_s": max(r.get("vocabulary_s", 0) for r in ranks),
        "tokens_s": max(r.get("tokens_s", 0) for r in ranks),
        "first_batch_s": max(r["first_batch_s"] for r in ranks),
        "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * args.batch_size,
        "loader_ms_per_step": 1000 * max(r["loader_s"] for r in ranks) / args.steps,
        "steps_per_epoch": first["steps_per_epoch"],
        "epoch_min_extrapolated": first["steps_per_epoch"] / steps_per_s / 60,
        "peak_rss_mb": max(r["memory_mb"]["end"]["VmHWM"] for r in ranks),
        "rss_anon_end_mb": max(r["memory_mb"]["end"].get("RssAnon", 0) for r in ranks),
        "ranks": ranks,
    }


# ---------------------------------------------------------------------------------------------
TABLE_COLUMNS = [
    ("train images", lambda r: f"{r['images']:,}"), ("captions", lambda r: f"{r['captions']:,}"),
    ("processes", lambda r: f"{r['processes']} x {r['threads_per_process']} thr"),
    ("records s", lambda r: f"{r['records_s']:.1f}"), ("vocabulary s", lambda r: f"{r['vocabulary_s']:.1f}"),
    ("tokens s", lambda r: f"{r['tokens_s']:.1f}"), ("first batch s", lambda r: f"{r['first_batch_s']:.1f}"),
    ("steps/s", lambda r: f"{r['steps_per_s']:.2f}"), ("samples/s", lambda r: f"{r['samples_per_s']:.0f}"),
    ("loader ms/step", lambda r: f"{r['loader_ms_per_step']:.1f}"),
    ("epoch min (extrapolated)", lambda r: f"{r['epoch_min_extrapolated']:.1f}"),
    ("peak RSS MB/rank", lambda r: f"{r['peak_rss_mb']:.0f}"),
    ("RssAnon MB/rank at end", lambda r: f"{r['rss_anon_end_mb']:.0f}"),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(r) for _, cell in TABLE_COLUMNS) + " |"
              for r in sorted(rows, key=lambda r: (r["images"], r["processes"]))]
    return "\n".join(lines)


def machine() -> dict[str, str]:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                  if line.startswith("Model name")), "unknown CPU")
    return {"cpu": f"{model}, {os.cpu_count()} cores", "python": platform.python_version(),
            "torch": torch.__version__, "load_average": ", ".join(f"{x:.2f}" for x in os.getloadavg())}


def parse_sizes(text: str) -> list[int]:
    return [int(s.replace("_", "")) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,40000,113287", help="training images, comma-separated")
    parser.add_argument("--val-images", type=int, default=5000)
    parser.add_argument("--processes", default="1,2", help="process counts to run (2 = torchrun)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads per process (torchrun's "
                        "default; on shared cores a second thread spin-waits against other jobs)")
    parser.add_argument("--vocab-words", type=int, default=10_000)
    parser.add_argument("--workdir", help="where the synthetic set lives (kept, and reused when it "
                        "matches); default: a temporary folder, deleted at the end")
    parser.add_argument("--build-only", action="store_true", help="build the set in --workdir, measure nothing")
    parser.add_argument("--json", help="also write the rows (and every rank's report) here")
    parser.add_argument("--quick", action="store_true", help="smoke test: " + ", ".join(
        f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    if parser.parse_args(argv).quick:      # quick changes the defaults: options given still count
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    sizes, process_counts = parse_sizes(args.sizes), parse_sizes(args.processes)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-train-scale-"))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        build_set(workdir, sizes, args.val_images, args.vocab_words)
        if args.build_only:
            return 0
        (workdir / "runs").mkdir(exist_ok=True)
        info = machine()
        print(f"{info['cpu']} | Python {info['python']}, torch {info['torch']} | "
              f"load average at start: {info['load_average']}", file=sys.stderr)
        rows = []
        for n in sizes:
            for processes in process_counts:
                rows.append(measure(workdir, n, processes, args))
                print(f"  {n:,} images, {processes} process(es): {rows[-1]['steps_per_s']:.2f} steps/s, "
                      f"first batch {rows[-1]['first_batch_s']:.1f} s", file=sys.stderr)
                info["load_average_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
                if args.json:      # after every row: a run stopped part-way keeps what it measured
                    Path(args.json).write_text(json.dumps({"machine": info, "options": vars(args),
                                                           "rows": rows}, indent=1))
        print(f"\n{info['cpu']}; {args.steps} steps timed after {args.warmup}, global batch "
              f"{args.batch_size}; epoch = steps per epoch / steps/s (extrapolated)\n")
        print(markdown_table(rows))
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
