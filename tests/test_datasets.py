"""Dataset loaders on tiny real fixtures (and on ../shared/data when present), the messy cases,
the holdout split and the token dataset."""
import shutil
import warnings

import numpy as np
import pytest
import torch

from captioner.config import PreprocessConfig
from captioner.datasets import CaptionTokens, ImageCaptions, holdout_split, load_coco, load_flickr8k, pad_tokens
from captioner.preprocess import preprocess
from captioner.vocab import Vocabulary

FLICKR_TEST = ["2654514044_a70a6e2c21.jpg", "1258913059_07c613f7ff.jpg",
               "311146855_0b65fdb169.jpg", "2677656448_6b7e7702af.jpg"]


def load_with_warnings(loader, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = loader(*args)
    return records, [str(w.message) for w in caught]


# ---- Flickr8k ---------------------------------------------------------------------------------
def test_flickr8k_test_split(flickr8k_tiny):
    records, messages = load_with_warnings(load_flickr8k, flickr8k_tiny, "test")
    assert [r.image_id for r in records] == FLICKR_TEST           # split-file order
    assert all(len(r.captions) == 5 for r in records)
    dog = records[0]
    assert dog.path == str(flickr8k_tiny / "Images" / FLICKR_TEST[0])
    assert "A brown dog running over grass ." in dog.captions
    # the absent test image and the caption line for no image: skipped, ONE warning
    assert messages == ["Flickr8k test: skipped 1 captions that point to no image, 1 missing images"]


@pytest.mark.parametrize("split, count", [("train", 3), ("dev", 1), ("val", 1)])
def test_flickr8k_other_splits(flickr8k_tiny, split, count):
    records, messages = load_with_warnings(load_flickr8k, flickr8k_tiny, split)
    assert len(records) == count and all(len(r.captions) == 5 for r in records)
    # 1 line for no image + the 5 captions of the test image whose file is absent
    assert messages == [f"Flickr8k {split}: skipped 6 captions that point to no image"]


def test_flickr8k_bad_arguments(flickr8k_tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown Flickr8k split 'testing'"):
        load_flickr8k(flickr8k_tiny, "testing")
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt not found"):
        load_flickr8k(tmp_path, "test")


def test_flickr8k_unreadable_lines_and_images_without_captions(flickr8k_tiny, tmp_path):
    root = tmp_path / "flickr"
    shutil.copytree(flickr8k_tiny, root)
    with open(root / "Flickr8k.token.txt", "a") as f:
        f.write("\n2654514044_a70a6e2c21.jpg#5\t   \nno tab on this line\n\n")
    (root / "Images" / "0000_uncaptioned.jpg").write_bytes(b"")
    with open(root / "Flickr_8k.testImages.txt", "a") as f:
        f.write("0000_uncaptioned.jpg\n")
    records, messages = load_with_warnings(load_flickr8k, root, "test")
    assert [r.image_id for r in records] == FLICKR_TEST
    assert messages == ["Flickr8k test: skipped 2 malformed caption lines, 1 captions that point to "
                        "no image, 1 missing images, 1 images without captions"]


@pytest.mark.data
def test_real_flickr8k(shared_data):
    records, messages = load_with_warnings(load_flickr8k, shared_data / "flickr8k", "test")
    assert len(records) == 1000 and all(len(r.captions) == 5 for r in records)
    # the real "2258277193_586949ec62.jpg.1#0" line and the 4 other captions of that absent photo
    assert messages == ["Flickr8k test: skipped 5 captions that point to no image"]
    train, _ = load_with_warnings(load_flickr8k, shared_data / "flickr8k", "train")
    assert len(train) == 6000 and not {r.image_id for r in train} & {r.image_id for r in records}


# ---- COCO -------------------------------------------------------------------------------------
def test_coco_with_pycocotools(coco_tiny, capsys):
    records, messages = load_with_warnings(load_coco, coco_tiny, "train2017")
    assert [r.image_id for r in records] == sorted((r.image_id for r in records), key=int)
    assert {r.image_id for r in records} == {"159269", "78499", "252639", "463557", "488571", "249346"}
    assert all(len(r.captions) == 5 for r in records)
    bus = next(r for r in records if r.image_id == "252639")
    assert bus.path == str(coco_tiny / "train2017" / "000000252639.jpg")
    assert "a long green and white bus driving down the road" in bus.captions   # stripped
    assert messages == ["COCO train2017: skipped 1 captions that point to no image, 1 empty captions, "
                        "1 missing images"]
    assert capsys.readouterr().out == ""          # pycocotools' chatter must not reach stdout


def test_coco_missing_annotations(tmp_path, coco_tiny):
    with pytest.raises(FileNotFoundError, match=r"captions_val2017.json not found \(splits there: none"):
        load_coco(tmp_path, "val2017")
    with pytest.raises(FileNotFoundError, match=r"captions_test.json not found \(splits there: train2017;"):
        load_coco(coco_tiny, "test")


@pytest.mark.parametrize("split, ids", [
    ("train", ["159269", "78499", "252639"]),      # train + restval
    ("restval", ["252639"]),
    ("val", ["463557"]),
    ("test", ["488571", "249346"]),
])
def test_coco_karpathy_splits(coco_tiny, split, ids):
    records, messages = load_with_warnings(load_coco, coco_tiny, split, coco_tiny / "dataset_coco.json")
    assert [r.image_id for r in records] == ids and messages == []
    assert all(len(r.captions) == 5 and r.captions[0][0].isalpha() for r in records)


def test_coco_karpathy_unknown_split(coco_tiny):
    with pytest.raises(ValueError, match="Karpathy split 'train2017'"):
        load_coco(coco_tiny, "train2017", coco_tiny / "dataset_coco.json")


@pytest.mark.data
def test_real_coco_mini(shared_data):
    records, messages = load_with_warnings(load_coco, shared_data / "coco-mini", "train2017")
    assert len(records) == 80 and all(len(r.captions) == 5 for r in records) and messages == []
    assert preprocess(records[0].path, PreprocessConfig(image_size=32)).shape == (3, 32, 32)


# ---- holdout ----------------------------------------------------------------------------------
def test_holdout_split_is_deterministic():
    records = [ImageCaptions(str(i), f"{i}.jpg", [f"caption {i}"]) for i in range(120)]
    train, val = holdout_split(records, 0.05, seed=3)
    assert (train, val) == holdout_split(list(records), 0.05, seed=3)
    assert len(val) == 6 and len(train) == 114
    assert sorted(r.image_id for r in train + val) == sorted(r.image_id for r in records)
    assert [r.image_id for r in holdout_split(records, 0.05, seed=4)[1]] != [r.image_id for r in val]
    assert holdout_split(records[:1], 0.05) == (records[:1], [])
    assert len(holdout_split(records[:3], 0.01)[1]) == 1      # at least one validation image


# ---- tokens -----------------------------------------------------------------------------------
def test_caption_tokens_skip_unusable_images(flickr8k_tiny):
    records, _ = load_with_warnings(load_flickr8k, flickr8k_tiny, "test")
    vocab = Vocabulary.build([c for r in records for c in r.captions], min_count=1)
    usable = np.array([True, False, True, True])
    tokens = CaptionTokens(records, vocab, max_len=6, usable=usable)
    assert len(tokens) == 15 and {row for row, _ in tokens} == {0, 2, 3}
    row, ids = tokens[0]
    assert row == 0 and ids == vocab.encode(records[0].captions[0], 6)
    assert all(len(ids) <= 8 and ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id for _, ids in tokens)
    assert len(CaptionTokens(records, vocab, max_len=6)) == 20


def test_pad_tokens():
    batch = pad_tokens([[1, 5, 2], [1, 2], [1, 7, 8, 9, 2]], pad_id=0)
    assert batch.dtype == torch.long
    assert batch.tolist() == [[1, 5, 2, 0, 0], [1, 2, 0, 0, 0], [1, 7, 8, 9, 2]]
