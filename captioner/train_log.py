"""What a training run reports: metrics.jsonl (a record at every checkpoint and every epoch, each
once, also after a kill and --resume), curves.png, and a line per epoch on stdout. Rank 0 writes."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import atomic_write

METRICS_FILE, CURVES_FILE = "metrics.jsonl", "curves.png"


class RunLog:
    def __init__(self, out: Path, writes: bool):
        self.metrics, self.curves, self.writes = out / METRICS_FILE, out / CURVES_FILE, writes

    def record(self, record: dict) -> None:
        if self.writes:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def resume_at(self, step: int) -> None:
        """Keep the records up to `step` (where a resumed run continues): the ones after it were
        written by the killed run and will be written again. Records are written before their
        checkpoint, so a kill between the two leaves only such records, never a gap."""
        if self.writes and self.metrics.is_file():
            lines = self.metrics.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
            if len(kept) != len(lines):
                atomic_write(self.metrics, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))

    def show_epoch(self, record: dict, improved: bool) -> None:
        """The epoch's line on stdout, and the curves redrawn (after its record)."""
        if self.writes:
            loss = f"{record['train_loss']:.3f}" if record["train_loss"] is not None else "-"
            print(f"epoch {record['epoch']}: loss {loss}  val BLEU-4 {record['val_BLEU-4'] or 0:.4f}  "
                  f"CIDEr {record['val_CIDEr']:.4f}{'  (best)' if improved else ''}  "
                  f"{record['epoch_seconds']:.0f}s", flush=True)
            plot_curves(self.metrics, self.curves)


def plot_curves(metrics_file: Path, png: Path) -> None:
    """Training loss and validation CIDEr / BLEU-4 against epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "val_CIDEr" not in r and r.get("train_loss") is not None]
    epochs = [r for r in rows if "val_CIDEr" in r]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    if steps:
        ax_loss.plot([r["epoch"] for r in steps], [r["train_loss"] for r in steps], lw=1, label="train (running)")
    ax_loss.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="train (epoch mean)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    ax_loss.legend()
    ax_val.plot([r["epoch"] for r in epochs], [r["val_CIDEr"] for r in epochs], "o-", label="CIDEr")
    ax_val.plot([r["epoch"] for r in epochs], [r["val_BLEU-4"] for r in epochs], "s-", label="BLEU-4")
    ax_val.set(xlabel="epoch", title="validation (greedy)")
    ax_val.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
