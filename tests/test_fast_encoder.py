"""The ONNX Runtime encoder: same features and captions as eager PyTorch, a cache keyed by the
weights, and a fallback to eager PyTorch (with one warning) when the fast path is unavailable."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from captioner import fast_encoder
from captioner.api import Captioner
from captioner.config import PreprocessConfig
from captioner.fast_encoder import (FastEncoderWarning, OnnxEncoder, encoder_fingerprint,
                                    load_fast_encoder, make_encode_fn)

SMALL = PreprocessConfig(image_size=32)


class SmallEncoder(nn.Module):
    """A conv net small enough to export in a second or two: images (B, 3, S, S) -> (B, 8)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, images):
        return torch.relu(self.norm(self.conv(images))).mean(dim=(2, 3))       # (B, 8)


class InputDependent(SmallEncoder):
    """Branches on pixel values: an export traces one branch and disagrees with eager."""

    def forward(self, images):
        features = super().forward(images)
        return features + 1 if float(images.std()) > 0.5 else features


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fast_encoder, "_warned", set())


@pytest.fixture(scope="module")
def fast_captioner(tiny_checkpoint) -> Captioner:
    return Captioner.load(tiny_checkpoint)          # fast=True is the default on CPU


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    torch.manual_seed(0)
    encoder = SmallEncoder().eval()
    cache = tmp_path_factory.mktemp("onnx")
    return encoder, cache, load_fast_encoder(encoder, SMALL, cache_dir=cache)


def fixture_images(captioner, flickr8k_tiny: Path) -> torch.Tensor:
    paths = sorted((flickr8k_tiny / "Images").glob("*.jpg"))
    return torch.stack([captioner.preprocess(p) for p in paths])               # (N, 3, S, S)


def test_onnx_features_equal_eager(fast_captioner, flickr8k_tiny):
    assert isinstance(fast_captioner.fast_encoder, OnnxEncoder)
    images = fixture_images(fast_captioner, flickr8k_tiny)
    with torch.inference_mode():
        eager = fast_captioner.encoder(images)                                 # (N, 1280)
    for batch in (images[:1], images[:5], images):                             # dynamic batch
        fast = fast_captioner.fast_encoder(batch)
        assert fast.shape == (len(batch), 1280)
        assert torch.allclose(fast, eager[: len(batch)], atol=1e-4, rtol=0)
    assert eager.abs().max() > 0.1     # real features, not all zeros


def test_fast_path_gives_the_same_captions(fast_captioner, tiny_captioner, flickr8k_tiny):
    eager = tiny_captioner
    assert eager.fast_encoder is None
    paths = sorted(str(p) for p in (flickr8k_tiny / "Images").glob("*.jpg"))
    for method in ("greedy", "beam"):
        fast_caps = fast_captioner.caption(paths, method=method, beam_size=3)
        eager_caps = eager.caption(paths, method=method, beam_size=3)
        assert [c.text for c in fast_caps] == [c.text for c in eager_caps]
        assert [c.score for c in fast_caps] == pytest.approx([c.score for c in eager_caps], abs=1e-3)
    assert len({c.text for c in fast_caps}) > 1    # the captions depend on the image


def test_fingerprint_covers_weights_and_preprocessing():
    torch.manual_seed(0)
    encoder = SmallEncoder()
    key = encoder_fingerprint(encoder, SMALL)
    assert encoder_fingerprint(encoder, PreprocessConfig(image_size=32)) == key
    assert encoder_fingerprint(encoder, PreprocessConfig(image_size=64)) != key
    assert encoder_fingerprint(encoder, PreprocessConfig(image_size=32, mean=(0.4, 0.5, 0.5))) != key
    with torch.no_grad():
        encoder.conv.weight[0, 0, 0, 0] += 1e-3
    assert encoder_fingerprint(encoder, SMALL) != key
    with torch.no_grad():
        encoder.conv.weight[0, 0, 0, 0] -= 1e-3
    encoder.norm.running_mean += 1      # buffers count too: they change the output
    assert encoder_fingerprint(encoder, SMALL) != key


def test_export_is_cached_and_reused(small_export, monkeypatch):
    encoder, cache, session = small_export
    assert session is not None
    files = list(cache.glob("*.onnx"))
    assert [f.name for f in files] == [f"{encoder_fingerprint(encoder, SMALL)}.onnx"]
    assert not list(cache.glob("*.tmp"))      # the atomic write left nothing behind

    def no_export(*args, **kwargs):
        raise AssertionError("a cached export must not be exported again")

    monkeypatch.setattr(fast_encoder, "export_onnx", no_export)
    again = load_fast_encoder(encoder, SMALL, cache_dir=cache)
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(again(images), encoder(images), atol=1e-5)


def test_corrupt_cache_file_is_replaced(small_export, tmp_path):
    encoder, cache, _ = small_export
    name = f"{encoder_fingerprint(encoder, SMALL)}.onnx"
    (tmp_path / name).write_bytes(b"not an onnx model")
    session = load_fast_encoder(encoder, SMALL, cache_dir=tmp_path)
    assert session is not None and (tmp_path / name).stat().st_size > 1000


def test_no_onnxruntime_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)      # import raises ImportError
    encoder = SmallEncoder().eval()
    with pytest.warns(FastEncoderWarning, match="onnxruntime is not installed"):
        assert load_fast_encoder(encoder, SMALL) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # the second time: silent
        encode = make_encode_fn(encoder, SMALL, "cpu")
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(encode(images), encoder(images), atol=1e-5)


def test_failed_export_falls_back_to_eager(monkeypatch, tmp_path):
    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.warns(FastEncoderWarning, match="exporter exploded"):
        assert load_fast_encoder(SmallEncoder().eval(), SMALL, cache_dir=tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_export_that_disagrees_with_eager_is_rejected(tmp_path):
    encoder = InputDependent().eval()
    with pytest.warns(FastEncoderWarning, match="differs from PyTorch"):
        assert load_fast_encoder(encoder, SMALL, cache_dir=tmp_path) is None
    assert not list(tmp_path.glob("*.onnx"))


def test_make_encode_fn_uses_the_fast_path(tiny_captioner, flickr8k_tiny):
    encode = make_encode_fn(tiny_captioner.encoder, tiny_captioner.preprocess_cfg, "cpu")
    assert isinstance(encode, OnnxEncoder)
    images = fixture_images(tiny_captioner, flickr8k_tiny)[:3]
    with torch.inference_mode():
        assert torch.allclose(encode(images), tiny_captioner.encoder(images), atol=1e-4)


def test_enable_fast_encoder_threads_and_off(tiny_checkpoint):
    captioner = Captioner.load(tiny_checkpoint, fast=False)
    assert captioner.enable_fast_encoder(threads=1) is True
    assert captioner.fast_encoder.session.get_session_options().intra_op_num_threads == 1
    assert captioner.enable_fast_encoder(False) is False and captioner.fast_encoder is None


