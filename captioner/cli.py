"""`captioner` command line: caption | train | evaluate | serve | combine. Thin shells over the API."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import fields
from pathlib import Path

from .config import DATASETS, LR_SCHEDULES, DataConfig, ModelConfig, TrainConfig

# Exit statuses, one meaning each (scripts branch on them; see EXIT_STATUSES_HELP and the README).
EXIT_OK = 0               # all done: every input captioned
EXIT_INPUTS_FAILED = 1    # some inputs could not be captioned (their error rows are in the output)
EXIT_USAGE = 2            # nothing done: bad options, unusable checkpoint, mismatched resume
EXIT_CRASH = 3            # an unexpected error, i.e. a bug: the traceback is printed
EXIT_INTERRUPTED = 130    # Ctrl-C (128 + SIGINT, as shells report it)
EXIT_BROKEN_PIPE = 141    # the reader of stdout went away (`| head`): 128 + SIGPIPE, as for `yes | head`
EXIT_STATUSES_HELP = f"""exit status:
  {EXIT_OK}    all inputs captioned
  {EXIT_INPUTS_FAILED}    some inputs failed (each gets an error row and a warning; rerun to retry them)
  {EXIT_USAGE}    usage error, nothing done: bad options, unusable checkpoint, or OUT written by
       another checkpoint or other decoding options (see --overwrite)
  {EXIT_CRASH}    crash (a bug: please report the traceback)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
  {EXIT_BROKEN_PIPE}  stdout closed early (e.g. `captioner caption photos/ | head -1`); quietly"""


TRAIN_OPTION_HELP = {
    "patience": "0: never stop early",
    "fine_tune_top": "fine-tune the last N blocks and head of an EfficientNet-Lite CNN on cached activations "
                     "(minutes per epoch on a CPU), at --cnn-lr; best with --init-from a trained model. 0: off",
}
MODEL_SIZE_OPTIONS = ("embed_dim", "hidden_dim", "num_layers", "dropout")


def add_decode_args(parser: argparse.ArgumentParser, default_method: str | None = None) -> None:
    group = parser.add_argument_group("decoding (defaults: the checkpoint's)")
    group.add_argument("--method", choices=["greedy", "sample", "beam"], default=default_method)
    group.add_argument("--beam-size", type=int)
    group.add_argument("--max-len", type=int)
    group.add_argument("--length-penalty", type=float)
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--seed", type=int)
    group.add_argument("--no-repeat-ngram-size", type=int, metavar="N",
                       help="never repeat an n-gram of N words (0 = off)")


def decode_overrides(args) -> dict:
    names = ("method", "beam_size", "max_len", "length_penalty", "temperature", "top_k", "top_p", "seed",
             "no_repeat_ngram_size")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def add_data_args(parser: argparse.ArgumentParser, evaluate: bool = False) -> None:
    """--dataset and where it is; --split for evaluate, --train-split/--val-split for train and prepare."""
    group = parser.add_argument_group("data (layouts: data/README.md)")
    group.add_argument("--dataset", choices=DATASETS, required=True,
                       help="flickr8k | coco | karpathy (a Karpathy split file: Flickr8k, Flickr30k, COCO) | "
                            "imagefolder (your photos with metadata.jsonl or metadata.csv)")
    group.add_argument("--data-root", required=True,
                       help="the dataset's folder (karpathy: the folder its filepath/filename are under)")
    group.add_argument("--karpathy-json", help="dataset_X.json: Karpathy's split file (--dataset karpathy or coco)")
    if evaluate:
        group.add_argument("--split", default="test", help="the split to score, by the dataset's names (default "
                                                           "test; flickr8k: train | dev | test; karpathy, "
                                                           "imagefolder: train | val | test)")
        return
    group.add_argument("--train-split", help="default train (coco without --karpathy-json: train2017)")
    group.add_argument("--val-split", help="default: the dataset's own (flickr8k dev; karpathy, imagefolder, "
                                           "coco with --karpathy-json: val), or hold out part of train")


def data_config(args) -> DataConfig:
    """The data options as a DataConfig; ValueError for a combination that would be ignored."""
    if args.karpathy_json and args.dataset not in ("karpathy", "coco"):
        raise ValueError(f"--karpathy-json is read with --dataset karpathy (or coco), not {args.dataset}: "
                         "for Karpathy's Flickr8k or Flickr30k file use --dataset karpathy --data-root IMAGES")
    if args.dataset == "karpathy" and not args.karpathy_json:
        raise ValueError("--dataset karpathy needs --karpathy-json dataset_X.json")
    coco_folders = args.dataset == "coco" and not args.karpathy_json
    return DataConfig(dataset=args.dataset, data_root=args.data_root,
                      train_split=getattr(args, "train_split", None) or ("train2017" if coco_folders else "train"),
                      val_split=getattr(args, "val_split", None), karpathy_json=args.karpathy_json,
                      min_word_count=getattr(args, "min_word_count", DataConfig.min_word_count))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner", description="Show-and-Tell image captioning.",
        epilog=f"exit status: {EXIT_OK} done, {EXIT_INPUTS_FAILED} some inputs failed (caption), "
               f"{EXIT_USAGE} usage error (bad options, an unusable checkpoint), {EXIT_CRASH} crash, "
               f"{EXIT_INTERRUPTED} Ctrl-C, {EXIT_BROKEN_PIPE} stdout closed early; "
               "see captioner caption --help")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "caption", help="caption images, files or folders, to JSON Lines or CSV",
        description="Caption image files, folders and glob patterns. Rerun the same command to "
                    "resume: images already captioned in OUT are skipped, failed ones are retried.",
        epilog=EXIT_STATUSES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", help="OUT.jsonl or OUT.csv, appended to (default: JSON Lines on stdout), "
                                          "or OUT.html: a contact sheet to review the captions in a browser; "
                                          "OUT.provenance.json beside it records the checkpoint and options")
    p.add_argument("--overwrite", action="store_true",
                   help="start OUT again instead of resuming (needed to change checkpoint or options); "
                        "also replaces existing sidecars and embedded descriptions")
    p.add_argument("--sidecar", choices=["txt"],
                   help="txt: write photo.txt beside photo.jpg holding the caption (kept if it exists)")
    p.add_argument("--xmp", action="store_true",
                   help="write an XMP sidecar photo.jpg.xmp with the caption as dc:description "
                        "(digiKam, darktable; kept if it exists)")
    p.add_argument("--embed", action="store_true",
                   help="write the caption INTO each photo (XMP dc:description and EXIF ImageDescription; "
                        "pixels and modification time kept; a description already there is kept)")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="include subfolders (and folders matched by patterns; ** matches any depth)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no summary (per-file warnings still go to stderr)")
    p.add_argument("--checkpoint", help="checkpoint file or folder (default: the shipped model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="image-reading processes (default: CPU cores, at most 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-fast", action="store_true",
                   help="run the CNN in eager PyTorch instead of ONNX Runtime (same captions, slower)")
    add_decode_args(p)

    p = sub.add_parser("train", help="train a captioner on Flickr8k, COCO, a Karpathy split file or your own photos")
    add_data_args(p)
    p.add_argument("--min-word-count", type=int, default=DataConfig.min_word_count)
    p.add_argument("--output", required=True, help="run folder: best/, last.safetensors, metrics, curves")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from this trained model (file or run folder, e.g. checkpoints/model.safetensors): "
                        "its weights, model options and preprocessing; its vocabulary extended with the "
                        "data's words seen --min-word-count times")
    # Model options default to None, so that --init-from can tell which were asked for.
    p.add_argument("--backbone", help=f"default {ModelConfig.backbone}")
    for name in MODEL_SIZE_OPTIONS:
        default = getattr(ModelConfig, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), help=f"default {default}")
    p.add_argument("--no-feature-norm", action="store_true")
    p.add_argument("--tie-embeddings", action="store_true",
                   help="the readout layer shares the word embedding (needs --embed-dim == --hidden-dim)")
    for f in fields(TrainConfig):
        if f.name in ("output", "fine_tune_cnn", "resume", "amp", "cache_dir", "flip_augment", "init_from"):
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       choices=LR_SCHEDULES if f.name == "lr_schedule" else None,
                       help=TRAIN_OPTION_HELP.get(f.name))
    p.add_argument("--cache-dir", help="feature cache folder (default ~/.cache/captioner/features)")
    p.add_argument("--fine-tune-cnn", action="store_true", help="train the CNN too, with augmentation")
    p.add_argument("--flip-augment", action="store_true",
                   help="also cache the mirrored photos' features and train on them half of the time")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.safetensors")

    p = sub.add_parser("prepare", help="build the feature cache training reads (progress bar; torchrun shards it)",
                       description="Encode every image of the training and validation splits once with "
                                   "the frozen CNN into the memory-mapped fp16 feature cache that "
                                   "`captioner train` with the same data options reads.")
    add_data_args(p)
    p.add_argument("--backbone", default=ModelConfig.backbone)
    p.add_argument("--cache-dir", help="feature cache folder (default ~/.cache/captioner/features)")
    p.add_argument("--device", default=TrainConfig.device)
    p.add_argument("--num-workers", type=int, default=TrainConfig.num_workers, help="image-decoding processes")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="as for train: picks the held-out validation images")
    p.add_argument("--val-images", type=int, default=TrainConfig.val_images, help="as for train")
    p.add_argument("--flip-augment", action="store_true", help="as for train: also the mirrored photos")
    p.add_argument("--fine-tune-top", type=int, default=TrainConfig.fine_tune_top,
                   help="as for train: cache the activations below the CNN's last N blocks")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="as for train: the checkpoint's CNN and preprocessing")

    p = sub.add_parser("evaluate", help="coco-caption metrics (BLEU, METEOR, ROUGE-L, CIDEr) on a split")
    p.add_argument("--checkpoint", help="checkpoint file or folder (default: the shipped model)")
    add_data_args(p, evaluate=True)
    p.add_argument("--json", help="write scores and captions to this JSON file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-fast", action="store_true",
                   help="run the CNN in eager PyTorch instead of ONNX Runtime (same captions, slower)")
    add_decode_args(p)

    p = sub.add_parser("serve", help="start the web UI (same as python app.py)")
    p.add_argument("--checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true")

    p = sub.add_parser("combine", help="ensemble checkpoints that share encoder and vocabulary")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--half", action="store_true", help="store weights as fp16")
    return parser


def cmd_caption(args) -> int:
    from .batch import caption_inputs
    return caption_inputs(args)


def requested_model_options(args) -> dict:
    """The model options given on the command line (not their defaults)."""
    requested = {name: getattr(args, name) for name in ("backbone",) + MODEL_SIZE_OPTIONS
                 if getattr(args, name) is not None}
    if args.no_feature_norm:
        requested["feature_norm"] = False
    if args.tie_embeddings:
        requested["tie_embeddings"] = True
    return requested


def cmd_train(args) -> int:
    from .train import fit

    if args.init_from:
        from .init_from import model_config_from, read_initial_checkpoint
        model_cfg = model_config_from(read_initial_checkpoint(args.init_from, tensors=False),
                                      requested_model_options(args))
    else:
        model_cfg = ModelConfig(**requested_model_options(args))
    data_cfg = data_config(args)
    train_values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                    if f.name != "amp" and hasattr(args, f.name)}
    train_cfg = TrainConfig(**{**train_values, "amp": not args.no_amp})
    best = fit(model_cfg, data_cfg, train_cfg)
    if os.environ.get("RANK", "0") == "0":     # under torchrun: once, not once per process
        print(f"best checkpoint: {best}")
    return 0


def cmd_prepare(args) -> int:
    from .train import prepare_features

    train_cfg = TrainConfig(cache_dir=args.cache_dir, device=args.device, num_workers=args.num_workers,
                            seed=args.seed, val_images=args.val_images, flip_augment=args.flip_augment,
                            fine_tune_top=args.fine_tune_top,
                            init_from=args.init_from)
    counts = prepare_features(ModelConfig(backbone=args.backbone), data_config(args), train_cfg)
    if os.environ.get("RANK", "0") == "0":
        for split, (readable, total) in counts.items():
            print(f"{split}: {readable} of {total} images cached")
    return 0


def cmd_evaluate(args) -> int:
    from .api import Captioner
    from .datasets import load_split
    from .evaluate import evaluate_records, format_scores, require_java

    require_java()
    records = load_split(data_config(args), args.split)        # first: a wrong split fails fast
    captioner = Captioner.load(args.checkpoint, device=args.device, fast=not args.no_fast)
    cfg = captioner.decode_config(**decode_overrides(args))
    scores, captions = evaluate_records(captioner, records, cfg, batch_size=args.batch_size)
    print(f"{args.dataset} {args.split}: {len(captions)} images, {cfg.method}"
          f"{f' (beam {cfg.beam_size})' if cfg.method == 'beam' else ''}")
    print(format_scores(scores))
    print("SPICE: not computed (it downloads Stanford CoreNLP at first use, which fails offline)")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, "split": args.split,
                                               "scores": scores, "decode": vars(cfg),
                                               "captions": captions}, indent=1))
    return 0


def cmd_serve(args) -> int:
    from .webapp import serve
    return serve(args.checkpoint, host=args.host, port=args.port, share=args.share)


def cmd_combine(args) -> int:
    from .ensemble import combine
    path = combine(args.checkpoints, args.output, half=args.half)
    print(f"wrote {path}")
    return 0


COMMANDS = {"caption": cmd_caption, "train": cmd_train, "prepare": cmd_prepare, "evaluate": cmd_evaluate,
            "serve": cmd_serve, "combine": cmd_combine}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (argparse exits with 2 on bad options)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read stdout stopped (`| head`): no message, and no second error when Python
        # flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (FileNotFoundError, ValueError) as exc:
        # ValueError includes CheckpointError (any unusable checkpoint), the batch CLI's
        # UsageError and BackboneUnavailable: all one line saying what to fix.
        print(f"captioner {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # a bug: keep the traceback for the report, and say so
        traceback.print_exc()
        print(f"captioner {args.command}: internal error (exit status {EXIT_CRASH}); please report "
              "it with the traceback above", file=sys.stderr)
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
