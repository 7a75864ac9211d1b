"""Data-parallel training under torchrun: 2 processes, gloo, on CPU, over the coco_tiny photos.

Every run goes through `captioner train` (tests/distributed_worker.py adds only a reproducible
kill -9 and a per-rank dump of the weights). Tolerances:
- the 2 ranks' weights must be bit-identical (DDP all-reduces the same gradients on both);
- 2 ranks vs 1 process with the same global batch and seed (dropout 0): within 1e-3 absolute
  after 10 Adam steps at lr 1e-2 (measured ~4e-5: float sums in another order; averaging the
  per-rank mean losses instead of normalising by the global word count is off by ~8e-2);
- kill -9 + --resume vs uninterrupted: within 1e-6 (measured: bit-identical).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from captioner import cli
from captioner.config import DataConfig, ModelConfig, TrainConfig
from captioner.checkpoint import state_with_prefix
from captioner.train import Trainer, prepare_features
from train_fixtures import (COCO_TINY, checkpoint_tensors, karpathy_split, max_difference,
                            requires_java, train_args)

pytestmark = requires_java
WORKER = str(Path(__file__).with_name("distributed_worker.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(command: list, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(c) for c in command], env=environment, capture_output=True, text=True,
                          timeout=300)


def test_two_ranks_stay_identical_and_match_one_process(tmp_path, capsys):
    """1 epoch of the decoder on cached features, then 1 epoch fine-tuning CNN + decoder on
    augmented images (dropout 0, so one process can take exactly the same steps)."""
    split, cache = karpathy_split(tmp_path), tmp_path / "cache"
    options = dict(fine_tune_cnn=True, fine_tune_after_epochs=1, cnn_lr=1e-3)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    ddp = run(TORCHRUN + [WORKER] + train_args(split, tmp_path / "ddp", cache, **options),
              env={"TEST_DUMP_DIR": str(dumps)})
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    rank0, rank1 = load_file(str(dumps / "rank0.safetensors")), load_file(str(dumps / "rank1.safetensors"))
    assert max_difference(rank0, rank1) == 0.0
    # Only rank 0 writes: one line per checkpoint (steps 3, 6, 9) and per epoch, and one summary.
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line).get("step") for line in lines] == [3, 5, 6, 9, 10]
    assert ddp.stdout.count("best checkpoint:") == 1
    assert (tmp_path / "ddp" / "curves.png").stat().st_size > 0

    # The cache the 2 ranks built in halves holds the rows a single process computes.
    data_cfg = DataConfig(dataset="coco", data_root=str(COCO_TINY), train_split="train",
                          val_split="val", karpathy_json=str(split), min_word_count=1)
    prepare_features(ModelConfig(), data_cfg, TrainConfig(cache_dir=str(tmp_path / "cache1"), num_workers=0))
    sharded, whole = sorted(cache.glob("features-*.npy")), sorted((tmp_path / "cache1").glob("features-*.npy"))
    assert [p.name for p in sharded] == [p.name for p in whole] and len(whole) == 2
    for p, q in zip(sharded, whole):
        assert np.allclose(np.load(p), np.load(q), atol=1e-2)

    assert cli.main(train_args(split, tmp_path / "single", cache, **options)) == 0
    single = checkpoint_tensors(tmp_path / "single" / "last.safetensors", "")
    ddp_last = checkpoint_tensors(tmp_path / "ddp" / "last.safetensors", "")
    weights = [k for k in single if k.startswith(("decoders.", "encoder."))]
    assert max_difference(rank0, {k: ddp_last[k] for k in weights}) == 0.0
    assert max_difference({k: single[k] for k in weights}, {k: ddp_last[k] for k in weights}) < 1e-3
    # ... while training moved the weights much further than that, so the comparison means
    # something; the CNN learned too, with its BatchNorm statistics left as they were.
    initial = initial_weights(data_cfg, tmp_path)
    assert max_difference(initial, {k: single[k] for k in initial}) > 0.05
    changed = {k for k in initial if k.startswith("encoder.") and not torch.equal(initial[k], single[k])}
    assert changed and all(k.endswith(("weight", "bias")) for k in changed)

    # The run folder is a checkpoint `captioner caption` uses (its best/ model).
    capsys.readouterr()
    image = COCO_TINY / "train2017" / "000000159269.jpg"
    assert cli.main(["caption", "--checkpoint", str(tmp_path / "ddp"), str(image)]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["image"] == str(image) and isinstance(row["caption"], str)


def initial_weights(data_cfg: DataConfig, tmp_path: Path) -> dict:
    """The CNN and decoder weights training starts from: a Trainer's, before any step."""
    trainer = Trainer(ModelConfig(embed_dim=32, hidden_dim=32, dropout=0.0), data_cfg,
                      TrainConfig(output=str(tmp_path / "initial"), seed=3, cache_dir=str(tmp_path / "cache"),
                                  num_workers=0))
    return {**state_with_prefix("decoders.0.", trainer.decoder),
            **state_with_prefix("encoder.", trainer.captioner.encoder)}


def test_kill_and_resume_under_torchrun_matches_uninterrupted(tmp_path):
    """Dropout 0.3, so every rank's RNG must come back; kill -9 in the second epoch after the
    checkpoint at step 6 (steps 7 and 8 are lost and redone), resumed by torchrun."""
    split, cache = karpathy_split(tmp_path), tmp_path / "cache"
    whole = run(TORCHRUN + [WORKER] + train_args(split, tmp_path / "whole", cache, dropout=0.3))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(TORCHRUN + [WORKER] + train_args(split, tmp_path / "killed", cache, dropout=0.3),
                 env={"TEST_KILL_AT_STEP": "8"})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    position = json.loads(load_header(tmp_path / "killed" / "last.safetensors")["trainer"])
    assert (position["epoch"], position["step_in_epoch"], position["global_step"]) == (1, 1, 6)

    resumed = run(TORCHRUN + ["-m", "captioner"] + train_args(split, tmp_path / "killed", cache, dropout=0.3)
                  + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = load_file(str(tmp_path / "whole" / "last.safetensors"))
    result = load_file(str(tmp_path / "killed" / "last.safetensors"))
    assert reference.keys() == result.keys()
    assert not torch.equal(reference["rng.cpu.0"], reference["rng.cpu.1"])
    assert max_difference(reference, result) <= 1e-6


def load_header(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()
