"""The feature cache (captioner/features.py): image loading with bad files as rows, computed once
and reused, keyed by everything that changes the features, sharded and merged."""
import json
import warnings

import numpy as np
import pytest
import torch

from captioner.config import PreprocessConfig
from captioner.features import cache_key, cached_features, image_loader, merge_feature_shards
from captioner.preprocess import preprocess

CFG = PreprocessConfig(image_size=32)
W = "digest of the encoder's weights"


class CountingEncoder:
    """A real (if simple) encoder: per-channel mean and std of each image; counts its calls."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, images):                          # (B, 3, S, S) -> (B, 6)
        self.calls += 1
        self.images += images.shape[0]
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


@pytest.fixture
def image_paths(flickr8k_tiny, tmp_path):
    """The 8 fixture photos plus one file that is not an image, in the middle."""
    paths = sorted(str(p) for p in (flickr8k_tiny / "Images").glob("*.jpg"))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    return paths[:4] + [str(bad)] + paths[4:]


def test_image_loader_reports_bad_images_as_rows(image_paths):
    seen, errors = [], []
    for indices, images, errs in image_loader(image_paths, CFG, batch_size=3, num_workers=0):
        assert images.shape == (len(indices), 3, 32, 32)
        seen += indices
        errors += errs
    assert seen == [0, 1, 2, 3, 5, 6, 7, 8]
    assert len(errors) == 1 and errors[0][0] == 4 and "not an image" in str(errors[0][1])


def test_feature_cache_computes_once_and_is_reused(image_paths, tmp_path):
    encoder = CountingEncoder()
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images \(first: .*broken.jpg"):
        features, ok = cached_features(encoder, "stats", CFG, image_paths, tmp_path / "cache",
                                       batch_size=4, num_workers=0, progress=False, weights=W)
    assert encoder.images == 8
    assert ok.tolist() == [True] * 4 + [False] + [True] * 4
    assert features.shape == (9, 6) and features.dtype == np.float16
    expected = encoder(torch.stack([preprocess(p, CFG) for i, p in enumerate(image_paths) if i != 4]))
    assert np.allclose(features[ok], expected.numpy(), atol=2e-3)    # fp16 storage

    encoder.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a cache hit reads no image at all
        again, ok_again = cached_features(encoder, "stats", CFG, image_paths, tmp_path / "cache",
                                          num_workers=0, progress=False, weights=W)
    assert encoder.calls == 0
    assert np.array_equal(again, features) and np.array_equal(ok_again, ok)
    assert isinstance(again, np.memmap)


def test_feature_cache_key_covers_backbone_preprocessing_and_images(image_paths, tmp_path):
    key = cache_key("stats", CFG, image_paths, weights=W)
    assert key == cache_key("stats", PreprocessConfig(image_size=32), list(image_paths), weights=W)
    assert key != cache_key("other", CFG, image_paths, weights=W)
    assert key != cache_key("stats", PreprocessConfig(image_size=64), image_paths, weights=W)
    assert key != cache_key("stats", PreprocessConfig(image_size=32, resize="pad"), image_paths, weights=W)
    assert key != cache_key("stats", CFG, image_paths[:-1], weights=W)
    assert key != cache_key("stats", CFG, image_paths, variant="augmented", weights=W)
    assert key != cache_key("stats", CFG, image_paths, weights="other weights")

    encoder = CountingEncoder()
    good = [p for p in image_paths if not p.endswith("broken.jpg")]
    small, _ = cached_features(encoder, "stats", CFG, good, tmp_path, num_workers=0, progress=False, weights=W)
    big, _ = cached_features(encoder, "stats", PreprocessConfig(image_size=64), good, tmp_path,
                             num_workers=0, progress=False, weights=W)
    assert encoder.images == 16                          # the new preprocessing was computed
    assert not np.array_equal(small, big)
    assert len(list(tmp_path.glob("features-*.npy"))) == 2


def test_feature_cache_shards_merge_to_the_same_features(image_paths, tmp_path):
    with pytest.warns(UserWarning, match="skipped 1 unreadable images"):
        whole, ok = cached_features(CountingEncoder(), "stats", CFG, image_paths, tmp_path / "one",
                                    num_workers=0, progress=False, weights=W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rank in range(2):
            assert cached_features(CountingEncoder(), "stats", CFG, image_paths, tmp_path / "two",
                                   num_workers=0, shard=(rank, 2), progress=False, weights=W) == (None, None)
    merge_feature_shards(tmp_path / "two", cache_key("stats", CFG, image_paths, weights=W), len(image_paths), 2)
    encoder = CountingEncoder()
    merged, merged_ok = cached_features(encoder, "stats", CFG, image_paths, tmp_path / "two",
                                        num_workers=0, progress=False, weights=W)
    assert encoder.calls == 0
    assert np.array_equal(merged, whole) and np.array_equal(merged_ok, ok)
    done = json.loads(next((tmp_path / "two").glob("features-*.json")).read_text())
    assert done["ok"] == ok.tolist()


class SlowCountingEncoder(CountingEncoder):
    """Takes its time, so that two processes building the same cache overlap."""

    def __call__(self, images):
        import time
        time.sleep(0.3)
        return super().__call__(images)


def build_in_another_process(paths, cache_dir, queue):
    encoder = SlowCountingEncoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features, ok = cached_features(encoder, "stats", CFG, paths, cache_dir, batch_size=2, num_workers=0,
                                       progress=False, weights=W)
    queue.put((encoder.images, np.asarray(features).tolist(), ok.tolist()))


def test_two_runs_building_the_same_cache_at_once_build_it_once(image_paths, tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    runs = [context.Process(target=build_in_another_process, args=(image_paths, tmp_path / "cache", queue))
            for _ in range(2)]
    for run in runs:
        run.start()
    results = [queue.get(timeout=120) for _ in runs]
    for run in runs:
        run.join(timeout=60)
    assert sorted(images for images, _, _ in results) == [0, 8]      # one encoded, the other waited
    assert results[0][1:] == results[1][1:]
    names = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".npy")   # no parts, no temporaries


def test_cache_folders_come_from_the_users_cache_folder(tmp_path, monkeypatch):
    from captioner.fast_encoder import onnx_cache_dir
    from captioner.encoder import encoder_digest
    from captioner.features import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "captioner" / "features"
    assert onnx_cache_dir() == tmp_path / "captioner" / "onnx"

    layer = torch.nn.Linear(3, 2)
    before = encoder_digest(layer)
    assert encoder_digest(layer) == before
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3
    assert encoder_digest(layer) != before
