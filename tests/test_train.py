"""Training pieces in one process: schedule, sampler, augmentation, COCO/Karpathy loading, the
feature cache and `captioner prepare`, the resumable checkpoint, CNN fine-tuning, clear errors.
(torchrun runs are in test_distributed.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import cli, features
from captioner.config import DataConfig, ModelConfig, PreprocessConfig, TrainConfig
from captioner.datasets import load_coco
from captioner.encoder import build_backbone
from captioner.train import Trainer
from captioner.train_data import Augment, ResumableSampler
from captioner.train_optim import lr_scheduler
from train_fixtures import (COCO_TINY, checkpoint_tensors, karpathy_split, max_difference,
                            requires_java, train_args)

TESTS = Path(__file__).resolve().parent
COCO_MINI = TESTS.parent.parent / "shared" / "data" / "coco-mini"


# -- schedule, sampler, augmentation ----------------------------------------------------------
def lr_of_each_step(cfg: TrainConfig, steps_per_epoch: int, steps: int) -> list[float]:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, cfg, steps_per_epoch)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_lr_warms_up_linearly_then_follows_the_schedule():
    cfg = TrainConfig(epochs=2, warmup_steps=10, lr_schedule="cosine")
    factors = lr_of_each_step(cfg, steps_per_epoch=55, steps=111)
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[110] == pytest.approx(0.05)
    step_cfg = TrainConfig(lr_schedule="step", lr_step_epochs=2, lr_step_gamma=0.5, warmup_steps=0)
    assert lr_of_each_step(step_cfg, 10, 50)[::10] == [1.0, 1.0, 0.5, 0.5, 0.25]
    warm_step = TrainConfig(lr_schedule="step", lr_step_epochs=1, lr_step_gamma=0.5, warmup_steps=4)
    assert lr_of_each_step(warm_step, 10, 24)[3::10] == pytest.approx([1.0, 0.5, 0.25])   # epochs count from step 0
    constant = lr_of_each_step(TrainConfig(lr_schedule="constant", warmup_steps=2), 10, 30)
    assert constant[:3] == [0.5, 1.0, 1.0] and set(constant[2:]) == {1.0}


def test_a_misspelled_lr_schedule_is_refused(tmp_path, capsys):
    split = karpathy_split(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(train_args(split, tmp_path / "run", tmp_path / "cache", lr_schedule="cosin"))
    assert "invalid choice: 'cosin'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="TrainConfig.lr_schedule must be one of cosine | step | constant"):
        Trainer(*small_configs(tmp_path, split, lr_schedule="cosin"))
    assert not (tmp_path / "cache").exists()


def test_rank_shards_together_are_the_single_process_batches_and_resume_skips_indices():
    items = list(range(20))
    single = list(ResumableSampler(items, num_replicas=1, rank=0, seed=7))
    assert sorted(single) == items and single != items          # a permutation, shuffled
    shards = [list(ResumableSampler(items, num_replicas=2, rank=r, seed=7)) for r in range(2)]
    for k in range(5):     # global batch 4 = 2 per rank
        assert sorted(shards[0][2 * k:2 * k + 2] + shards[1][2 * k:2 * k + 2]) == sorted(single[4 * k:4 * k + 4])

    sampler = ResumableSampler(items, num_replicas=2, rank=1, seed=7)
    sampler.set_position(epoch=3, start=4)
    tail = list(sampler)
    sampler.set_position(epoch=3, start=0)
    assert tail == list(sampler)[4:] and len(tail) == 6
    sampler.set_position(epoch=4, start=0)
    assert list(sampler) != list(ResumableSampler(items, 2, 1, seed=7))   # reshuffled per epoch


def test_augmentation_depends_only_on_seed_epoch_and_item():
    image = str(COCO_TINY / "train2017" / "000000159269.jpg")
    augment = Augment(PreprocessConfig(image_size=64), seed=5)
    first = np.asarray(augment(image, epoch=2, item=11))
    assert np.array_equal(first, np.asarray(Augment(PreprocessConfig(image_size=64), seed=5)(image, epoch=2, item=11)))
    others = [np.asarray(augment(image, epoch=e, item=i)) for e, i in [(3, 11), (2, 12), (4, 0), (5, 1)]]
    assert not any(first.shape == other.shape and np.array_equal(first, other) for other in others)


# -- COCO loaders ----------------------------------------------------------------------------
def test_karpathy_split_file_on_the_fixture(tmp_path):
    split_file = COCO_TINY / "dataset_coco.json"
    entries = json.loads(split_file.read_text())["images"]
    train = load_coco(COCO_TINY, "train", split_file)
    expected = {str(e["cocoid"]) for e in entries if e["split"] in ("train", "restval")}
    assert {r.image_id for r in train} == expected                  # train includes restval
    assert all(len(r.captions) == 5 and os.path.isfile(r.path) for r in train)
    assert [r.image_id for r in load_coco(COCO_TINY, "val", split_file)] == [
        str(e["cocoid"]) for e in entries if e["split"] == "val"]
    with pytest.raises(ValueError, match="Karpathy split 'train2017'"):
        load_coco(COCO_TINY, "train2017", split_file)


def test_karpathy_2014_names_find_coco_2017_files(tmp_path):
    """The real split file names train2014/COCO_train2014_<id>.jpg; COCO 2017 has <id>.jpg."""
    data = json.loads((COCO_TINY / "dataset_coco.json").read_text())
    for entry in data["images"]:
        entry["filepath"] = "val2014"
        entry["filename"] = f"COCO_val2014_{entry['cocoid']:012d}.jpg"
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    records = load_coco(COCO_TINY, "test", tmp_path / "dataset_coco.json")
    assert records and all(Path(r.path).parent == COCO_TINY / "train2017" for r in records)


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"needs the real COCO files in {COCO_MINI}")
def test_coco_loader_on_coco_mini(tmp_path):
    records = load_coco(COCO_MINI, "train2017")
    assert len(records) == 80 and sum(len(r.captions) for r in records) == 400
    assert all(os.path.isfile(r.path) for r in records)
    # The same photos through a split file in the real 2014 naming (as dataset_coco.json has it).
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": f"COCO_train2014_{int(r.image_id):012d}.jpg",
         "cocoid": int(r.image_id), "imgid": i, "split": "train" if i % 8 else "val",
         "sentences": [{"raw": c, "tokens": c.lower().split()} for c in r.captions]}
        for i, r in enumerate(records)]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    train = load_coco(COCO_MINI, "train", tmp_path / "dataset_coco.json")
    val = load_coco(COCO_MINI, "val", tmp_path / "dataset_coco.json")
    assert (len(train), len(val)) == (70, 10)
    assert {r.path for r in train + val} == {r.path for r in records}


# -- feature cache and `captioner prepare` ---------------------------------------------------
def small_configs(tmp_path: Path, split: Path, data_root: Path = COCO_TINY, **train
                  ) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    values = dict(output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), epochs=1, batch_size=4,
                  lr=1e-2, warmup_steps=0, checkpoint_every=0, num_workers=0, seed=3)
    return (ModelConfig(embed_dim=32, hidden_dim=32, dropout=0.3),
            DataConfig(dataset="coco", data_root=str(data_root), train_split="train", val_split="val",
                       karpathy_json=str(split), min_word_count=1),
            TrainConfig(**{**values, **train}))


def test_prepare_builds_the_memory_mapped_cache_that_training_reads(tmp_path, capsys, monkeypatch):
    split = karpathy_split(tmp_path)
    assert cli.main(["prepare", "--dataset", "coco", "--data-root", str(COCO_TINY), "--karpathy-json",
                     str(split), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == ["train: 4 of 4 images cached", "val: 1 of 1 images cached"]
    files = sorted(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))   # (locks)
    assert len(files) == 4                              # (array, completion marker) x (train, val)

    def no_encoding(*args, **kwargs):
        raise AssertionError("training encoded images although prepare had cached them")
    monkeypatch.setattr(features, "image_loader", no_encoding)
    trainer = Trainer(*small_configs(tmp_path, split))
    assert isinstance(trainer.data.train_features, np.memmap) and trainer.data.train_features.dtype == np.float16
    assert trainer.data.train_features.shape == (4, 1280) and trainer.data.val_usable.tolist() == [True]
    assert sorted(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == files

    # The recipe's pair: prepare --flip-augment caches the mirrored photos train --flip-augment reads.
    monkeypatch.undo()
    assert cli.main(["prepare", "--dataset", "coco", "--data-root", str(COCO_TINY), "--karpathy-json", str(split),
                     "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--flip-augment"]) == 0
    assert "train mirrored: 4 of 4 images cached" in capsys.readouterr().out
    monkeypatch.setattr(features, "image_loader", no_encoding)
    flipped = Trainer(*small_configs(tmp_path, split, flip_augment=True))
    assert flipped.data.mirrored_features.shape == (4, 1280)
    assert not np.array_equal(flipped.data.mirrored_features, flipped.data.train_features)

    # And prepare --fine-tune-top caches the activations below the top that train --fine-tune-top reads.
    monkeypatch.undo()
    assert cli.main(["prepare", "--dataset", "coco", "--data-root", str(COCO_TINY), "--karpathy-json", str(split),
                     "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--fine-tune-top", "2"]) == 0
    monkeypatch.setattr(features, "image_loader", no_encoding)
    top = Trainer(*small_configs(tmp_path, split, fine_tune_top=2))
    assert top.data.train_features.shape == (4, 192 * 7 * 7) and top.data.val_features.shape == (1, 192 * 7 * 7)


# -- resumable checkpoint --------------------------------------------------------------------
@requires_java
def test_last_checkpoint_restores_optimizer_rng_and_position(tmp_path):
    split = karpathy_split(tmp_path)
    model_cfg, data_cfg, cfg = small_configs(tmp_path, split)
    trainer = Trainer(model_cfg, data_cfg, cfg)
    trainer.fit()
    rng = torch.get_rng_state()
    saved = trainer.optim.optimizer.state_dict()

    resumed = Trainer(model_cfg, data_cfg, TrainConfig(**{**vars(cfg), "resume": True}))
    assert torch.equal(torch.get_rng_state(), rng)
    assert resumed.state == trainer.state and resumed.state["global_step"] == 5
    loaded = resumed.optim.optimizer.state_dict()
    assert json.loads(json.dumps(loaded["param_groups"])) == json.loads(json.dumps(saved["param_groups"]))
    assert loaded["state"].keys() == saved["state"].keys() and len(saved["state"]) == len(trainer.optim.params)
    for idx, slots in saved["state"].items():
        for name, value in slots.items():
            assert torch.equal(loaded["state"][idx][name], value), (idx, name)
    assert max_difference(resumed.decoder.state_dict(), trainer.decoder.state_dict()) == 0.0


def whole_and_killed(tmp_path: Path, split: Path, cache: Path, options: dict) -> None:
    """The same run twice: tmp_path/whole uninterrupted; tmp_path/killed killed with SIGKILL after
    step 8 (its last checkpoint: step 6), then resumed with --resume to the end."""
    assert cli.main(train_args(split, tmp_path / "whole", cache, **options)) == 0
    killed = subprocess.run([sys.executable, str(TESTS / "distributed_worker.py")]
                            + train_args(split, tmp_path / "killed", cache, **options),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TEST_KILL_AT_STEP": "8"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert cli.main(train_args(split, tmp_path / "killed", cache, resume=True, **options)) == 0


@requires_java
def test_kill_and_resume_in_one_process_matches_uninterrupted(tmp_path):
    """kill -9 (rank 0 of a world of one) after step 8, resume from the step-6 checkpoint, in the
    fine-tuning epoch: with dropout 0.3 and augmentation the result is bit-identical only if the
    RNG state came back and the augmentation does not depend on it."""
    split, cache = karpathy_split(tmp_path), tmp_path / "cache"
    options = dict(dropout=0.3, fine_tune_cnn=True, fine_tune_after_epochs=1, cnn_lr=1e-3)
    whole_and_killed(tmp_path, split, cache, options)
    whole = checkpoint_tensors(tmp_path / "whole" / "last.safetensors", "")
    result = checkpoint_tensors(tmp_path / "killed" / "last.safetensors", "")
    assert any(k.startswith("encoder.") for k in whole)
    assert max_difference(whole, result) == 0.0
    epochs = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in epochs if "val_CIDEr" in r] == [r["train_loss"] for r in expected if "val_CIDEr" in r]


# -- CNN fine-tuning -------------------------------------------------------------------------
@requires_java
def test_the_cnn_stays_frozen_during_the_settling_epochs(tmp_path):
    split, cache = karpathy_split(tmp_path), tmp_path / "cache"
    assert cli.main(train_args(split, tmp_path / "run", cache, fine_tune_cnn=True, fine_tune_after_epochs=1,
                               cnn_lr=1e-2, epochs=1)) == 0
    pretrained = build_backbone("efficientnet_lite0", pretrained=True).module.state_dict()
    settled = checkpoint_tensors(tmp_path / "run" / "last.safetensors", "encoder.")
    assert max_difference(settled, {f"encoder.{k}": v for k, v in pretrained.items()}) == 0.0
    # (test_distributed checks that the CNN does learn afterwards, BatchNorm statistics aside)


# -- clear errors ----------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    split = karpathy_split(tmp_path)
    assert cli.main(train_args(split, tmp_path / "run", tmp_path / "cache", device="cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_a_coco_split_name_with_a_karpathy_file_is_a_clear_error(tmp_path, capsys):
    split = karpathy_split(tmp_path)
    assert cli.main(train_args(split, tmp_path / "run", tmp_path / "cache", train_split="train2017")) == 2
    assert "Karpathy split 'train2017'" in capsys.readouterr().err


@requires_java
def test_resuming_with_other_trained_parameters_is_a_clear_error(tmp_path, capsys):
    split, cache = karpathy_split(tmp_path), tmp_path / "cache"
    assert cli.main(train_args(split, tmp_path / "run", cache, epochs=1)) == 0
    capsys.readouterr()
    assert cli.main(train_args(split, tmp_path / "run", cache, epochs=1, resume=True, fine_tune_cnn=True)) == 2
    assert "--fine-tune-cnn was False, now True" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
@requires_java
def test_mixed_precision_on_cuda(tmp_path):
    split = karpathy_split(tmp_path)
    model_cfg, data_cfg, cfg = small_configs(tmp_path, split, device="cuda")
    trainer = Trainer(model_cfg, data_cfg, cfg)
    assert trainer.optim.use_amp and trainer.optim.scaler.is_enabled()
    trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.decoder.parameters())


# -- the caption-quality levers: tied embeddings, scheduled sampling, mirrored features ---------
def test_tied_embeddings_share_one_matrix_and_survive_a_checkpoint(tmp_path):
    from captioner.api import Captioner
    from captioner.vocab import Vocabulary

    vocab = Vocabulary.build(["a dog runs", "a cat sits"], min_count=1)
    cfg = ModelConfig(embed_dim=16, hidden_dim=16, tie_embeddings=True)
    captioner = Captioner.create(cfg, vocab, pretrained=False)
    decoder = captioner.decoders[0]
    assert decoder.readout.weight is decoder.embed.weight
    with torch.no_grad():
        decoder.embed.weight.normal_()
    loaded = Captioner.load(captioner.save(tmp_path / "tied.safetensors"), fast=False)
    assert loaded.decoders[0].readout.weight is loaded.decoders[0].embed.weight
    assert torch.equal(loaded.decoders[0].readout.weight, decoder.embed.weight)
    with pytest.raises(ValueError, match="embed_dim == hidden_dim"):
        Captioner.create(ModelConfig(embed_dim=16, hidden_dim=32, tie_embeddings=True), vocab, pretrained=False)


@requires_java
def test_scheduled_sampling_ramps_and_never_touches_padding_or_start(tmp_path):
    split = karpathy_split(tmp_path)
    data_cfg = DataConfig(dataset="coco", data_root=str(COCO_TINY), karpathy_json=str(split), min_word_count=1,
                          val_split="val")
    cfg = TrainConfig(output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), epochs=2, batch_size=4,
                      num_workers=0, scheduled_sampling=0.5, scheduled_sampling_ramp=2)
    trainer = Trainer(ModelConfig(embed_dim=16, hidden_dim=16), data_cfg, cfg)
    trainer.model = trainer.decoder
    assert trainer.sampling_probability() == 0.0                       # step 0
    trainer.state["global_step"] = trainer.data.steps_per_epoch              # half-way up the ramp
    assert trainer.sampling_probability() == pytest.approx(0.25)
    trainer.state["global_step"] = 10 * trainer.data.steps_per_epoch
    assert trainer.sampling_probability() == pytest.approx(0.5)         # capped at the maximum
    features, tokens, unreadable = next(iter(trainer.begin_epoch(0)))
    assert unreadable == []
    fed = trainer.scheduled_inputs(features, tokens)
    pad = tokens == trainer.vocab.pad_id
    assert torch.equal(fed[pad], tokens[pad]) and torch.equal(fed[:, 0], tokens[:, 0])
    assert not ((fed == trainer.vocab.pad_id) & ~pad).any()             # a sampled word is never <pad>
    assert not torch.equal(fed, tokens)                                 # p = .5: some words replaced


def test_flip_choice_depends_only_on_seed_epoch_and_item():
    from captioner.train_data import FlipChoice

    items = [(i % 3, [1, 2]) for i in range(200)]
    choice = FlipChoice(items, seed=4, enabled=True)
    first = [choice[i][2] for i in range(200)]
    assert 60 < sum(first) < 140                                        # about half mirrored
    assert first == [choice[i][2] for i in range(200)]
    choice.epoch = 1
    assert first != [choice[i][2] for i in range(200)]
    assert not any(FlipChoice(items, seed=4, enabled=False)[i][2] for i in range(200))


@requires_java
def test_kill_and_resume_with_every_quality_lever_matches_uninterrupted(tmp_path):
    """Mirrored features, scheduled sampling and tied embeddings draw from the seeded streams
    resuming restores: a run killed after step 8 and resumed ends bit-identical."""
    split, cache = karpathy_split(tmp_path), tmp_path / "cache"
    options = dict(dropout=0.3, flip_augment=True, scheduled_sampling=0.3, scheduled_sampling_ramp=1,
                   tie_embeddings=True)
    whole_and_killed(tmp_path, split, cache, options)
    whole = checkpoint_tensors(tmp_path / "whole" / "last.safetensors", "decoders.")
    assert max_difference(whole, checkpoint_tensors(tmp_path / "killed" / "last.safetensors", "decoders.")) == 0.0
    assert len(list(cache.glob("features-*.npy"))) == 3                 # train, mirrored train, val


# -- early stopping, the best checkpoint, Java -------------------------------------------------
@pytest.mark.parametrize("patience, scores, epochs_run, best_epoch", [
    (2, [0.1, 0.3, 0.2, 0.25, 0.5, 0.6], 4, 2),      # two epochs without a better score: stop
    (1, [0.1, 0.2, 0.3, 0.1, 0.5], 4, 3),
    (0, [0.3, 0.2, 0.1, 0.05], 4, 1),                # 0: never stop early
    (3, [0.2, 0.2, 0.2, 0.2], 4, 1),                 # equal is not better
])
def test_early_stopping_and_the_best_checkpoint(tmp_path, patience, scores, epochs_run, best_epoch):
    from captioner.checkpoint import read_checkpoint

    trainer = Trainer(*small_configs(tmp_path, karpathy_split(tmp_path), epochs=len(scores), patience=patience))
    scripted = iter(scores)
    best_weights = {}

    def validate():
        score = next(scripted)
        if score > max([-1.0] + list(best_weights)):
            best_weights[score] = {k: v.clone() for k, v in trainer.decoder.state_dict().items()}
        return {"BLEU-4": 0.0, "CIDEr": score}

    trainer.validate = validate
    trainer.fit()
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_CIDEr"] for r in epochs if "val_CIDEr" in r] == scores[:epochs_run]
    best = read_checkpoint(tmp_path / "run" / "best" / "model.safetensors")
    best_score = max(scores[:epochs_run])
    assert best.info["epoch"] == best_epoch and best.info["val_scores"]["CIDEr"] == best_score
    assert all(torch.equal(best.tensors[f"decoders.0.{k}"], v) for k, v in best_weights[best_score].items())


@pytest.fixture
def no_java(tmp_path, monkeypatch):
    from captioner import evaluate

    evaluate.java_problem.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    yield
    evaluate.java_problem.cache_clear()


def test_without_java_training_and_evaluation_stop_at_once(tmp_path, capsys, no_java):
    split = karpathy_split(tmp_path)
    assert cli.main(train_args(split, tmp_path / "run", tmp_path / "cache")) == 2
    assert cli.main(["evaluate", "--dataset", "karpathy", "--karpathy-json", str(split), "--data-root",
                     str(COCO_TINY), "--split", "test"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"captioner {command}: error: METEOR and the PTB tokenizer need Java (no java on PATH): "
                      "install a JRE (Debian: apt-get install default-jre-headless)" for command in ("train", "evaluate")]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def scripted_validation(trainer: Trainer, scores=None) -> Trainer:
    """Validation without captioning or Java: CIDEr from the list (0.1 every epoch by default)."""
    scripted = iter(scores or [0.1] * 100)
    trainer.validate = lambda: {"BLEU-4": 0.0, "CIDEr": next(scripted)}
    return trainer


# -- resuming: the same run, or a clear refusal; metrics once each ----------------------------
def test_resuming_with_other_options_or_data_is_refused_naming_each(tmp_path):
    from dataclasses import replace

    split = karpathy_split(tmp_path)
    model_cfg, data_cfg, cfg = small_configs(tmp_path, split)
    scripted_validation(Trainer(model_cfg, data_cfg, cfg)).fit()
    changed = replace(cfg, resume=True, batch_size=2, seed=4, lr_schedule="step", epochs=3, flip_augment=True,
                      num_workers=1, patience=0, checkpoint_every=7)
    with pytest.raises(ValueError) as refused:
        Trainer(replace(model_cfg, hidden_dim=16), replace(data_cfg, min_word_count=2), changed)
    message = str(refused.value)
    for difference in ("--batch-size was 4, now 2", "--seed was 3, now 4", "--lr-schedule was cosine, now step",
                       "--epochs was 1, now 3", "--flip-augment was False, now True", "--hidden-dim was 32, now 16",
                       "--min-word-count was 1, now 2"):
        assert difference in message
    assert not any(f"{name} was" in message for name in ("num-workers", "patience", "checkpoint-every", "resume"))

    data = json.loads(split.read_text())
    data["images"][0]["sentences"][0]["raw"] = "a caption that was not there"
    split.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="the images or captions differ"):
        Trainer(model_cfg, data_cfg, replace(cfg, resume=True))


def test_metrics_hold_each_record_once_after_a_kill_between_log_and_checkpoint(tmp_path, monkeypatch):
    split = karpathy_split(tmp_path)
    model_cfg, data_cfg, cfg = small_configs(tmp_path, split, epochs=2, checkpoint_every=3)
    whole = scripted_validation(Trainer(model_cfg, data_cfg, TrainConfig(**{**vars(cfg), "output": str(tmp_path / "whole")})))
    whole.fit()
    expected = [json.loads(line)["step"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert expected == [3, 5, 6, 9, 10]

    killed = scripted_validation(Trainer(model_cfg, data_cfg, cfg))
    save_last = Trainer.save_last

    def killed_at_step_6(self):
        if self.state["global_step"] == 6:
            raise KeyboardInterrupt          # after the step-6 record, before its checkpoint
        save_last(self)
    monkeypatch.setattr(Trainer, "save_last", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    monkeypatch.setattr(Trainer, "save_last", save_last)
    scripted_validation(Trainer(model_cfg, data_cfg, TrainConfig(**{**vars(cfg), "resume": True}))).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == expected


def test_an_unreadable_photo_while_fine_tuning_is_skipped_and_counted(tmp_path):
    import shutil

    data_root = tmp_path / "coco"
    shutil.copytree(COCO_TINY, data_root)
    split = karpathy_split(tmp_path)
    trainer = scripted_validation(Trainer(*small_configs(tmp_path, split, data_root=data_root, fine_tune_cnn=True,
                                                         fine_tune_after_epochs=0)))
    broken = Path(trainer.train_records[1].path)          # readable when the feature cache was built
    broken.write_bytes(b"no longer a JPEG")
    with pytest.warns(UserWarning, match=f"fine-tuning: skipping unreadable images.*first: {broken}"):
        trainer.fit()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["unreadable_images"] == 5 and record["train_loss"] > 0      # its 5 captions


def test_a_training_state_from_before_names_its_validation_split_as_now():
    """Runs saved val_split "dev" for Flickr8k; the command line now leaves it None (the
    dataset's own validation split, dev): the same run, so resuming it is not refused."""
    from captioner.train_state import resume_differences

    cfg, model_cfg = TrainConfig(), ModelConfig()
    data_cfg = DataConfig(dataset="flickr8k", data_root="f8k", val_split=None)
    meta = {"model": vars(model_cfg), "info": {"train": vars(cfg), "data": {**vars(data_cfg), "val_split": "dev"}}}
    assert resume_differences(meta, cfg, data_cfg, model_cfg, None, "digest") == []
    meta["info"]["data"]["val_split"] = "test"
    assert resume_differences(meta, cfg, data_cfg, model_cfg, None, "digest") == ["--val-split was test, now dev"]


# -- fine-tuning the CNN's top on cached activations --------------------------------------------
@requires_java
def test_top_fine_tuning_trains_only_the_top_resumes_exactly_and_ships_the_tuned_cnn(tmp_path):
    """--fine-tune-top 1: the cache holds the activations entering the last block; only that block
    and the head change; a run killed after step 8 and resumed ends bit-identical; the best
    checkpoint carries the tuned CNN, and the fast (ONNX) path of the loaded model follows it."""
    from captioner import Captioner
    from captioner.encoder import split_for_top_tuning
    from captioner.preprocess import preprocess

    split, cache = karpathy_split(tmp_path), tmp_path / "cache"
    options = dict(dropout=0.3, fine_tune_top=1, cnn_lr=1e-2, scheduled_sampling=0.3, scheduled_sampling_ramp=1)
    whole_and_killed(tmp_path, split, cache, options)
    whole = checkpoint_tensors(tmp_path / "whole" / "last.safetensors", "")
    assert max_difference(whole, checkpoint_tensors(tmp_path / "killed" / "last.safetensors", "")) == 0.0

    arrays = [np.load(p, mmap_mode="r") for p in cache.glob("features-*.npy")]
    assert sorted(a.shape for a in arrays) == [(1, 192 * 7 * 7), (4, 192 * 7 * 7)]   # val, train: 224 / 32 = 7

    pretrained = build_backbone("efficientnet_lite0", pretrained=True).module
    last_block = f"net._blocks.{len(pretrained.net._blocks) - 1}."
    tuned = checkpoint_tensors(tmp_path / "whole" / "last.safetensors", "encoder.")
    changed = {k.removeprefix("encoder.") for k, v in tuned.items()
               if not torch.equal(v, pretrained.state_dict()[k.removeprefix("encoder.")])}
    assert changed and all(k.startswith((last_block, "net._conv_head.", "net._bn1.")) for k in changed), changed
    assert not any("running" in k for k in changed)                # batch norm keeps its statistics

    model = Captioner.load(tmp_path / "whole" / "best")
    image = preprocess(str(next(COCO_TINY.rglob("*.jpg"))), model.preprocess_cfg)[None]     # (1, 3, S, S)
    assert model.fast_encoder is not None
    with torch.no_grad():
        eager = model.encoder(image)
        assert (model.encode(image).cpu() - eager).abs().max() < 1e-3                # ONNX follows the tuning
        bottom, top = split_for_top_tuning(model.encoder, 1, model.preprocess_cfg.image_size)
        assert torch.equal(top(bottom(image)), eager)
        assert (eager - pretrained(image)).abs().max() > 1e-3
