"""Checkpoints: one safetensors file + JSON header; round trips, fp16, untrusted input, mismatches
between header and weights, atomic writes."""
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from captioner import checkpoint
from captioner.api import Captioner
from captioner.checkpoint import (CheckpointError, load_tensors, resolve_checkpoint, save_tensors)
from captioner.config import DataConfig, DecodeConfig, PreprocessConfig, TrainConfig, to_dict
from captioner.preprocess import preprocess


@pytest.fixture(scope="module")
def images(flickr8k_tiny):
    return sorted(str(p) for p in (flickr8k_tiny / "Images").glob("*.jpg"))


@pytest.fixture(scope="module")
def tiny_parts(tiny_checkpoint):
    """(tensors, header) of the session checkpoint, for making damaged copies."""
    return load_tensors(tiny_checkpoint)


def rewrite(path, tensors, meta):
    save_tensors(path, tensors, meta)
    return path


def captions(captioner, images):
    return [(c.text, round(c.score, 5)) for c in captioner.caption(images, method="beam", beam_size=3)]


def test_round_trip_gives_identical_captions(tiny_captioner, images, tmp_path):
    path = tiny_captioner.save(tmp_path / "copy.safetensors", info={"note": "copy"})
    loaded = Captioner.load(path, fast=False)
    original, restored = tiny_captioner.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded.vocab.itos == tiny_captioner.vocab.itos
    assert (loaded.model_cfg, loaded.preprocess_cfg, loaded.decode_cfg) == (
        tiny_captioner.model_cfg, tiny_captioner.preprocess_cfg, tiny_captioner.decode_cfg)
    assert loaded.info["note"] == "copy" and "trained_on" in loaded.info
    assert captions(loaded, images) == captions(tiny_captioner, images)


def test_save_to_a_folder_and_resolve_it(tiny_captioner, tmp_path):
    path = tiny_captioner.save(tmp_path / "run" / "best")
    assert path == tmp_path / "run" / "best" / "model.safetensors"
    assert resolve_checkpoint(tmp_path / "run" / "best") == path
    assert resolve_checkpoint(tmp_path / "run") == path          # a training run's folder
    assert Captioner.load(tmp_path / "run", fast=False).vocab.itos == tiny_captioner.vocab.itos


def test_preprocessing_travels_with_the_checkpoint(tiny_captioner, images, tmp_path):
    padded = PreprocessConfig(image_size=224, resize="pad", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    model = Captioner(tiny_captioner.encoder, tiny_captioner.decoders, tiny_captioner.vocab,
                      tiny_captioner.model_cfg, padded, DecodeConfig(method="greedy", max_len=7))
    loaded = Captioner.load(model.save(tmp_path / "pad.safetensors"), fast=False)
    assert loaded.preprocess_cfg == padded and loaded.decode_cfg.max_len == 7
    assert torch.equal(loaded.preprocess(images[0]), preprocess(images[0], padded))
    caption = loaded.caption(images[0])                       # the checkpoint's decoding defaults
    expected = loaded.caption_features(loaded.encode(preprocess(images[0], padded)[None]))[0]
    assert caption.text == expected.text and len(caption.words) <= 7


def test_header_is_plain_json(tiny_checkpoint, tiny_captioner):
    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "captioner/1"
    assert json.loads(header["vocab"]) == tiny_captioner.vocab.itos
    assert json.loads(header["model"])["hidden_dim"] == 64
    assert json.loads(header["decode"]) == json.loads(json.dumps(vars(DecodeConfig())))


def test_half_precision_checkpoint_loads(tiny_captioner, tiny_checkpoint, images, tmp_path):
    path = tiny_captioner.save(tmp_path / "half.safetensors", half=True)
    assert path.stat().st_size < 0.6 * tiny_checkpoint.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("decoders.0.readout.weight").dtype == torch.float16
    loaded = Captioner.load(path, fast=False)
    original = tiny_captioner.state_dict()
    for name, value in loaded.state_dict().items():
        assert value.dtype == original[name].dtype
        if value.is_floating_point():
            assert torch.allclose(value, original[name], rtol=1e-3, atol=1e-4), name
    greedy = lambda cap: [c.text for c in cap.caption(images, method="greedy")]   # noqa: E731
    assert greedy(loaded) == greedy(tiny_captioner)


class Boom:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["model.safetensors", "weights.pt"])
def test_a_pickle_is_never_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    torch.save({"decoders.0.embed.weight": torch.zeros(2, 2), "evil": Boom(str(marker))}, path)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Captioner.load(path, fast=False)
    path.write_bytes(pickle.dumps(Boom(str(marker))))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Captioner.load(path, fast=False)
    assert not marker.exists()


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_random_bytes_are_a_clear_error(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        Captioner.load(path, fast=False)
    assert str(info.value).startswith(f"{path}: not a safetensors file")


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        Captioner.load(path, fast=False)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Captioner.load(tmp_path / "nothing.safetensors", fast=False)
    with pytest.raises(CheckpointError, match="no model.safetensors in this folder"):
        Captioner.load(tmp_path, fast=False)


def test_vocabulary_that_disagrees_with_the_weights(tiny_parts, tmp_path):
    tensors, meta = tiny_parts
    size = len(meta["vocab"])
    # vocabulary and config both say one more word than the weights hold
    meta = {**meta, "vocab": meta["vocab"] + ["zebra"], "model": {**meta["model"], "vocab_size": size + 1}}
    path = rewrite(tmp_path / "bigger_vocab.safetensors", tensors, meta)
    with pytest.raises(CheckpointError) as info:
        Captioner.load(path, fast=False)
    message = str(info.value)
    assert "do not match the config/vocabulary" in message
    assert f"embed.weight: checkpoint ({size}, 32) vs config ({size + 1}, 32)" in message
    assert f"readout.bias: checkpoint ({size},) vs config ({size + 1},)" in message


def test_vocabulary_that_disagrees_with_the_config(tiny_parts, tmp_path):
    tensors, meta = tiny_parts
    path = rewrite(tmp_path / "vocab.safetensors", tensors, {**meta, "vocab": meta["vocab"][:-1]})
    size = meta["model"]["vocab_size"]
    with pytest.raises(CheckpointError, match=f"vocab_size={size} but the vocabulary has {size - 1} words"):
        Captioner.load(path, fast=False)


def test_tensor_with_the_wrong_shape(tiny_parts, tmp_path):
    tensors, meta = tiny_parts
    tensors = {**tensors, "decoders.0.init_h.bias": torch.zeros(65)}
    path = rewrite(tmp_path / "shape.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=r"init_h\.bias: checkpoint \(65,\) vs config \(64,\)"):
        Captioner.load(path, fast=False)


def test_missing_and_unexpected_tensors(tiny_parts, tmp_path):
    tensors, meta = tiny_parts
    damaged = {k: v for k, v in tensors.items() if k != "decoders.0.lstm.weight_hh_l0"}
    damaged["decoders.0.extra"] = torch.zeros(1)
    path = rewrite(tmp_path / "keys.safetensors", damaged, meta)
    with pytest.raises(CheckpointError,
                       match=r"missing \['decoders.0.lstm.weight_hh_l0'\].*unexpected \['decoders.0.extra'\]"):
        Captioner.load(path, fast=False)
    # the header promises two decoders, the file holds one
    path = rewrite(tmp_path / "two.safetensors", tensors, {**meta, "num_decoders": 2})
    with pytest.raises(CheckpointError, match=r"do not match.*missing \['decoders.1.embed.weight'"):
        Captioner.load(path, fast=False)


@pytest.mark.parametrize("key", ["vocab", "model", "preprocess"])
def test_missing_header_entry(tiny_parts, tmp_path, key):
    tensors, meta = tiny_parts
    path = rewrite(tmp_path / "header.safetensors", tensors, {k: v for k, v in meta.items() if k != key})
    with pytest.raises(CheckpointError, match=f"header has no '{key}' entry"):
        Captioner.load(path, fast=False)


def test_invalid_header_entry(tiny_parts, tmp_path):
    tensors, meta = tiny_parts
    path = rewrite(tmp_path / "header.safetensors", tensors,
                   {**meta, "model": {**meta["model"], "hidden_size": 64}})
    with pytest.raises(CheckpointError, match=r"invalid checkpoint header.*hidden_size"):
        Captioner.load(path, fast=False)


def test_corrupt_json_in_header(tiny_checkpoint, tmp_path):
    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        header = {**f.metadata(), "vocab": "[\"<pad>\", "}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "json.safetensors"), metadata=header)
    with pytest.raises(CheckpointError, match="corrupt JSON in checkpoint header"):
        Captioner.load(tmp_path / "json.safetensors", fast=False)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"x": torch.ones(3)}, {"info": "old"})
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_tensors(path, {"x": torch.zeros(3)}, {"info": "new"})
    with pytest.raises(OSError, match="disk full"):
        save_tensors(tmp_path / "fresh.safetensors", {"x": torch.zeros(3)}, {})
    assert path.read_bytes() == before                       # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["x"], torch.ones(3)) and meta == {"info": "old"}


def test_saved_header_carries_no_local_paths(tiny_captioner, tmp_path):
    """The trainer records its configs in info; their paths (run folder, feature cache, data)
    are the maker's machine, not the model: save drops them, and any path-like string."""
    info = {"dataset": "flickr8k", "recipe": "make train-flickr8k", "epoch": 10,
            "train": to_dict(TrainConfig(output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))),
            "data": to_dict(DataConfig(data_root="../shared/data/flickr8k", karpathy_json="k.json")),
            "ensemble_of": ["runs/a/best", "C:\\models\\b.safetensors", "~/m.safetensors"],
            "home": "/home/me", "link": "https://example.org/model-card"}
    path = tiny_captioner.save(tmp_path / "model.safetensors", info=info)
    with safe_open(str(path), framework="pt") as f:
        header = json.dumps(f.metadata())
    for local in (str(tmp_path), "shared/data", "k.json", "runs/", "models", "~/", "/home/me"):
        assert local not in header
    saved = Captioner.load(path, fast=False).info
    assert saved["train"]["epochs"] == TrainConfig.epochs and "output" not in saved["train"]
    assert "cache_dir" not in saved["train"] and "data_root" not in saved["data"]
    assert saved["data"]["train_split"] == "train" and saved["ensemble_of"] == []
    assert (saved["recipe"], saved["epoch"], saved["link"]) == (
        "make train-flickr8k", 10, "https://example.org/model-card")
    assert "home" not in saved and saved["trained_on"] == "flickr8k_tiny"
