"""Training curves of the recipe's decoders side by side: training loss and dev CIDEr per epoch.

    python scripts/plot_members.py runs/flickr8k/base runs/flickr8k/sampling runs/flickr8k/smoothing \
        runs/flickr8k/tied --out docs/training_curves.png

Each argument is a run folder with the metrics.jsonl that `captioner train` writes. Label smoothing
raises the training loss by construction, so compare the dev curves, not the loss levels. A run
that started (--init-from) from another run's epoch N is drawn after it: `--offset NAME=N`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def epoch_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_epoch = {r["epoch"]: r for r in rows if "val_CIDEr" in r}    # the last record of an epoch wins
    return [by_epoch[e] for e in sorted(by_epoch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default="docs/training_curves.png")
    parser.add_argument("--offset", action="append", default=[], metavar="NAME=EPOCHS",
                        help="shift the run folder named NAME by EPOCHS (it continued from that epoch)")
    args = parser.parse_args()
    offsets = {name: int(epochs) for name, epochs in (o.split("=", 1) for o in args.offset)}

    fig, (ax_loss, ax_cider) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in args.runs:
        rows = epoch_rows(run)
        epochs = [r["epoch"] + offsets.get(run.name, 0) for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", ms=3, label=run.name)
        ax_cider.plot(epochs, [r["val_CIDEr"] for r in rows], "o-", ms=3, label=run.name)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (epoch mean)", title="training loss")
    ax_cider.set(xlabel="epoch", ylabel="CIDEr", title="Flickr8k dev CIDEr (greedy), per epoch")
    for ax in (ax_loss, ax_cider):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
