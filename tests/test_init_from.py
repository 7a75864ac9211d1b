"""`captioner train --init-from CHECKPOINT`: a run that starts from a trained model captions as
that model does before any step, with its vocabulary extended by the new data's words."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from captioner import cli
from captioner.api import Captioner
from captioner.checkpoint import read_checkpoint
from captioner.config import DataConfig, ModelConfig, TrainConfig
from captioner.ensemble import ensemble_of
from captioner.init_from import NEW_WORD_MARGIN, read_initial_checkpoint
from captioner.train import Trainer
from train_fixtures import COCO_TINY, karpathy_split, requires_java, train_args


def started_trainer(tmp_path: Path, checkpoint: Path, **model) -> Trainer:
    """A Trainer on the coco_tiny photos (other words than the flickr8k_tiny checkpoint knows)."""
    data_cfg = DataConfig(dataset="coco", data_root=str(COCO_TINY), train_split="train", val_split="val",
                          karpathy_json=str(karpathy_split(tmp_path)), min_word_count=1)
    cfg = TrainConfig(output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), num_workers=0,
                      init_from=str(checkpoint))
    return Trainer(ModelConfig(**{"embed_dim": 32, "hidden_dim": 64, "dropout": 0.0, **model}), data_cfg, cfg)


def test_before_any_step_the_model_captions_as_the_checkpoint_does(tmp_path, tiny_checkpoint, flickr8k_tiny):
    reference = Captioner.load(tiny_checkpoint, fast=False)
    trainer = started_trainer(tmp_path, tiny_checkpoint)
    model, old = trainer.captioner.eval(), reference.vocab
    added = len(model.vocab) - len(old)
    assert model.vocab.itos[:len(old)] == old.itos and added > 20          # extended, old ids kept
    assert model.preprocess_cfg == reference.preprocess_cfg and model.decode_cfg == reference.decode_cfg

    # Old rows untouched; the CNN is the checkpoint's.
    saved = read_checkpoint(tiny_checkpoint).tensors
    for name, value in model.decoders[0].state_dict().items():
        stored = saved[f"decoders.0.{name}"]
        assert torch.equal(value[:len(old)] if name.startswith(("embed.", "readout.")) else value, stored), name
    assert all(torch.equal(v, saved[f"encoder.{k}"]) for k, v in model.encoder.state_dict().items())

    photos = sorted(str(p) for p in (flickr8k_tiny / "Images").glob("*.jpg"))[:4]
    photos += sorted(str(p) for p in (COCO_TINY / "train2017").glob("*.jpg"))[:2]
    for method in ("greedy", "beam"):
        expected = reference.caption(photos, method=method)
        got = model.caption(photos, method=method)
        assert [c.text for c in got] == [c.text for c in expected]
        # Within e^-16 p_unk / (1 - p_unk) a word: this tiny model gives <unk> up to ~99 %.
        assert [c.score for c in got] == pytest.approx([c.score for c in expected], abs=1e-4)

    # The new words leave the old words' probabilities as they were (float32 rounding aside)...
    features = reference.encode(torch.stack([reference.preprocess(p) for p in photos]))   # (6, D)
    state = reference.start_state(features)
    tokens = torch.full((len(photos),), old.bos_id)
    with torch.inference_mode():
        before, _ = reference.step(tokens, state)                                      # (6, V_old)
        after, _ = model.step(tokens, state)                                           # (6, V_old + K)
    allowed = torch.isfinite(before)                                                   # <pad> <start> <unk> banned
    assert torch.equal(allowed, torch.isfinite(after[:, :len(old)]))
    assert (after[:, :len(old)][allowed] - before[allowed]).abs().max().item() < 1e-5
    # ... and the new words together start with e^-16 of <unk>'s (pre-ban) probability.
    with torch.inference_mode():
        raw, _ = model.decoders[0].step(tokens, (state[0][:, 0], state[1][:, 0]))     # member 0 of (N, M, L, H)
    gap = raw[:, old.unk_id] - raw[:, len(old):].logsumexp(dim=1)                     # (6,)
    assert torch.allclose(gap, torch.full_like(gap, NEW_WORD_MARGIN), atol=1e-4)


def test_architecture_options_that_differ_from_the_checkpoint_are_refused(tmp_path, tiny_checkpoint, capsys):
    split = karpathy_split(tmp_path)
    args = train_args(split, tmp_path / "run", tmp_path / "cache", init_from=tiny_checkpoint, hidden_dim=32,
                      tie_embeddings=True)                  # embed 32 as the checkpoint's: no conflict
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--hidden-dim 32 (the checkpoint has hidden_dim=64); --tie-embeddings (the checkpoint has " \
           "tie_embeddings=False)" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--hidden-dim 32 \\(the checkpoint has hidden_dim=64\\)"):
        started_trainer(tmp_path, tiny_checkpoint, hidden_dim=32)


def test_an_ensemble_starts_from_its_first_decoder(tmp_path, tiny_checkpoint):
    member = Captioner.load(tiny_checkpoint, fast=False)
    path = ensemble_of([member, member], ["a", "b"]).save(tmp_path / "ensemble.safetensors")
    with pytest.warns(UserWarning, match="an ensemble of 2 decoders; training starts from its first decoder"):
        checkpoint = read_initial_checkpoint(path)
    assert checkpoint.num_decoders == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = started_trainer(tmp_path, path)
    assert len(trainer.captioner.decoders) == 1
    photo = str(COCO_TINY / "train2017" / "000000159269.jpg")
    assert trainer.captioner.eval().caption(photo, method="greedy").text == member.caption(
        photo, method="greedy").text


@requires_java
def test_a_run_started_from_a_checkpoint_trains_and_resumes(tmp_path, tiny_checkpoint):
    split, cache = karpathy_split(tmp_path), tmp_path / "cache"
    options = dict(init_from=tiny_checkpoint, embed_dim=None, hidden_dim=None)
    assert cli.main(train_args(split, tmp_path / "run", cache, epochs=1, **options)) == 0
    trained = Captioner.load(tmp_path / "run", fast=False)
    start = Captioner.load(tiny_checkpoint, fast=False)
    assert trained.vocab.itos[:len(start.vocab)] == start.vocab.itos and len(trained.vocab) > len(start.vocab)
    assert trained.model_cfg.hidden_dim == 64 and "started_from" in trained.info
    assert not torch.equal(trained.decoders[0].init_h.weight, start.decoders[0].init_h.weight)
    # The finished run resumes (nothing left to do) with the started run's vocabulary and CNN;
    # from another starting checkpoint, or none, it is refused.
    assert cli.main(train_args(split, tmp_path / "run", cache, epochs=1, resume=True, **options)) == 0
    assert Captioner.load(tmp_path / "run" / "best", fast=False).vocab.itos == trained.vocab.itos
    assert cli.main(train_args(split, tmp_path / "run", cache, epochs=1, resume=True, embed_dim=32,
                               hidden_dim=64)) == 2


def test_prepare_with_init_from_builds_the_cache_the_started_run_reads(tmp_path, tiny_checkpoint, monkeypatch):
    from captioner import features

    # Stored in fp16, the CNN's weights are no longer ImageNet's fp32 ones: another cache.
    half = Captioner.load(tiny_checkpoint, fast=False).save(tmp_path / "half.safetensors", half=True)
    split = karpathy_split(tmp_path)
    prepare = ["prepare", "--dataset", "karpathy", "--karpathy-json", str(split), "--data-root", str(COCO_TINY),
               "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"]
    assert cli.main(prepare) == 0 and cli.main(prepare + ["--init-from", str(half)]) == 0
    assert len(list((tmp_path / "cache").glob("features-*.npy"))) == 4      # (train, val) x 2 CNNs

    def no_encoding(*args, **kwargs):
        raise AssertionError("training encoded images although prepare had cached them")
    monkeypatch.setattr(features, "image_loader", no_encoding)
    data_cfg = DataConfig(dataset="karpathy", data_root=str(COCO_TINY), karpathy_json=str(split), train_split="train",
                          val_split="val", min_word_count=1)
    Trainer(ModelConfig(embed_dim=32, hidden_dim=64), data_cfg,
            TrainConfig(output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), num_workers=0,
                        init_from=str(half)))
