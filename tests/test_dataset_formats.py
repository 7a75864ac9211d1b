"""Your data in the formats people have: Hugging Face's imagefolder layout (metadata.jsonl or
metadata.csv; split folders, a split column, or neither) and Karpathy's split files (Flickr8k,
Flickr30k, COCO), with their messy rows, through the loaders and `captioner train / evaluate /
caption` end to end."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest
from conftest import requires_java
from PIL import Image

from captioner.cli import main
from captioner.config import DataConfig
from captioner.datasets import (ImageCaptions, imagefolder_splits, load_flickr8k, load_imagefolder,
                                load_karpathy, load_split, validation_split)
from captioner.train import load_splits

ROOT = Path(__file__).resolve().parents[1]


def load_quietly(loader, *args):
    """(records, the warnings' messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = loader(*args)
    return records, [str(w.message) for w in caught]


def make_images(folder: Path, *names: str) -> None:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (40 * i % 256, 90, 200)).save(folder / name)


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def captions_of(records: list[ImageCaptions]) -> dict[str, list[str]]:
    return {r.image_id: r.captions for r in records}


# ---- imagefolder: split folders -------------------------------------------------------------
@pytest.fixture
def split_folders(tmp_path) -> Path:
    """train/ (JSON Lines: two rows for one image, a captions list), validation/ (CSV, a list of
    captions in a cell), test/ (CSV, an extra column)."""
    make_images(tmp_path / "train", "a.jpg", "b.png", "sub/c.jpg")
    make_images(tmp_path / "validation", "d.jpg")
    make_images(tmp_path / "test", "e.jpg", "f.jpg")
    write_jsonl(tmp_path / "train" / "metadata.jsonl", [
        {"file_name": "a.jpg", "text": "A dog runs ."}, {"file_name": "b.png", "caption": " a cat "},
        {"file_name": "a.jpg", "text": "a brown dog"},
        {"file_name": "sub/c.jpg", "captions": ["one", "two", "three"]}])
    write_csv(tmp_path / "validation" / "metadata.csv", ["file_name", "captions"],
              [["d.jpg", json.dumps(["a bird, flying", "a gull"])]])
    write_csv(tmp_path / "test" / "metadata.csv", ["file_name", "caption", "extra"],
              [["e.jpg", "a tree", "x"], ["f.jpg", "a car", "y"], ["e.jpg", "green tree", "z"]])
    return tmp_path


def test_split_folders_with_jsonl_and_csv(split_folders):
    assert imagefolder_splits(split_folders) == ["train", "val", "test"]
    train, messages = load_quietly(load_imagefolder, split_folders, "train")
    assert messages == []
    assert captions_of(train) == {"train/a.jpg": ["A dog runs .", "a brown dog"], "train/b.png": ["a cat"],
                                  "train/sub/c.jpg": ["one", "two", "three"]}
    assert [r.path for r in train] == [str(split_folders / "train" / n) for n in ("a.jpg", "b.png", "sub/c.jpg")]
    for name in ("val", "validation", "dev"):                        # the usual spellings of one split
        assert captions_of(load_imagefolder(split_folders, name)) == {"validation/d.jpg": ["a bird, flying",
                                                                                          "a gull"]}
    assert captions_of(load_imagefolder(split_folders, "test")) == {
        "test/e.jpg": ["a tree", "green tree"], "test/f.jpg": ["a car"]}


def test_an_unknown_split_names_the_ones_there(split_folders, tmp_path):
    shutil.rmtree(split_folders / "test")
    with pytest.raises(ValueError, match=r"no split 'test' \(it has: train \| val\)"):
        load_imagefolder(split_folders, "test")
    with pytest.raises(ValueError, match=r"no split 'holiday' \(it has: train \| val\)"):
        load_imagefolder(split_folders, "holiday")


# ---- imagefolder: one metadata file ------------------------------------------------------------
def test_a_split_column_in_one_csv(tmp_path):
    make_images(tmp_path / "images", "1.jpg", "2.jpg", "3.jpg", "4.jpg")
    write_csv(tmp_path / "metadata.csv", ["file_name", "text", "split"], [
        ["images/1.jpg", "a red ball", "train"], ["images/2.jpg", "two dogs", "Train"],
        ["images/1.jpg", "a ball on grass", "train"], ["images/3.jpg", "a boat", "validation"],
        ["images/4.jpg", "a cup", "test"]])
    cfg = DataConfig(dataset="imagefolder", data_root=str(tmp_path))
    assert captions_of(load_split(cfg, "train")) == {"images/1.jpg": ["a red ball", "a ball on grass"],
                                                      "images/2.jpg": ["two dogs"]}
    assert validation_split(cfg) == "val"
    train, val = load_splits(cfg, seed=0)
    assert [r.image_id for r in val] == ["images/3.jpg"] and len(train) == 2
    assert [r.image_id for r in load_split(cfg, "test")] == ["images/4.jpg"]


def test_a_flat_folder_is_all_train_and_validation_is_held_out(tmp_path):
    names = [f"{i}.jpg" for i in range(20)]
    make_images(tmp_path, *names)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": n, "text": f"photo {n}"} for n in names])
    cfg = DataConfig(dataset="imagefolder", data_root=str(tmp_path), holdout_fraction=0.1)
    assert imagefolder_splits(tmp_path) == ["train"] and validation_split(cfg) is None
    train, val = load_splits(cfg, seed=1)
    assert len(train) == 18 and len(val) == 2
    assert sorted(r.image_id for r in train + val) == sorted(names)
    assert (train, val) == load_splits(cfg, seed=1)                   # the seed decides, nothing else
    assert [r.image_id for r in load_splits(cfg, seed=2)[1]] != [r.image_id for r in val]
    with pytest.raises(ValueError, match=r"no split 'test' \(it has: train\)"):
        load_split(cfg, "test")


def test_a_top_level_file_takes_the_split_from_the_folder_a_file_is_in(tmp_path):
    make_images(tmp_path, "train/a.jpg", "test/b.jpg", "photos/c.jpg")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "train/a.jpg", "text": "a"},
                                              {"file_name": "test/b.jpg", "text": "b"},
                                              {"file_name": "photos/c.jpg", "text": "c"}])
    assert imagefolder_splits(tmp_path) == ["train", "test"]
    assert [r.image_id for r in load_imagefolder(tmp_path, "train")] == ["train/a.jpg", "photos/c.jpg"]


# ---- imagefolder: messy rows and layout errors ---------------------------------------------------
def test_messy_csv_rows_are_counted_in_one_warning(tmp_path):
    make_images(tmp_path, "good.jpg", "other.jpg")
    (tmp_path.parent / "outside.jpg").write_bytes((tmp_path / "good.jpg").read_bytes())
    (tmp_path / "metadata.csv").write_text(
        "file_name,text,split\n"
        "good.jpg,a good photo,train\n"
        "good.jpg,\"a quoted, caption\",train\n"
        "good.jpg,\"unterminated quote,train\n"           # bad quoting
        "good.jpg,an unquoted, comma,train\n"             # one field too many
        "good.jpg,\"ab\"cd,train\n"                       # text after a closing quote
        "missing.jpg,no such file,train\n"
        "other.jpg,   ,train\n"                           # empty caption (and so no caption at all)
        "good.jpg,a photo,holiday\n"                      # unknown split
        ",no file name,train\n"
        "../outside.jpg,escapes the folder,train\n"
        f"{tmp_path / 'good.jpg'},an absolute path,train\n"
        "\n")
    records, messages = load_quietly(load_imagefolder, tmp_path, "train")
    assert captions_of(records) == {"good.jpg": ["a good photo", "a quoted, caption"]}
    assert messages == ["imagefolder train: skipped 3 malformed rows, 1 rows without file_name, "
                        "2 file names outside the folder, 1 rows with an unknown split, 1 empty captions, "
                        "1 missing images, 1 images without captions"]


def test_messy_jsonl_rows_are_counted_in_one_warning(tmp_path):
    make_images(tmp_path / "train", "a.jpg")
    write_jsonl(tmp_path / "train" / "metadata.jsonl", [
        {"file_name": "a.jpg", "text": "kept"}, "{not json", "[1, 2]", {"text": "no file name"},
        {"file_name": "a.jpg"}, {"file_name": "a.jpg", "captions": ["", "also kept", 7]},
        {"file_name": "C:\\photos\\a.jpg", "text": "a drive"}, {"file_name": "..\\a.jpg", "text": "up"}])
    records, messages = load_quietly(load_imagefolder, tmp_path, "train")
    assert captions_of(records) == {"train/a.jpg": ["kept", "also kept"]}
    assert messages == ["imagefolder train: skipped 2 malformed rows, 1 rows without file_name, "
                        "2 file names outside the folder, 1 rows without a caption, 2 empty captions"]


@pytest.mark.parametrize("layout, message", [
    ({"metadata.csv": "file_name,text\n", "metadata.jsonl": ""}, "both metadata.jsonl and metadata.csv"),
    ({"metadata.csv": "file_name,text\n", "train/metadata.csv": "file_name,text\n"},
     "both metadata.csv and train/metadata.csv"),
    ({"metadata.csv": "image,text\na.jpg,a dog\n"}, "needs a file_name column"),
    ({"metadata.csv": "file_name,label\na.jpg,dog\n"}, "and a caption column"),
    ({"photos/metadata.csv": "file_name,text\n"}, "no metadata.jsonl or metadata.csv in"),
])
def test_layout_errors_say_what_to_fix(tmp_path, layout, message):
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_imagefolder(tmp_path, "train")


# ---- Karpathy split files ----------------------------------------------------------------------
def karpathy_entry(filename, split, *raws, **extra):
    return {"filename": filename, "split": split, "sentences": [{"raw": r, "tokens": r.split()} for r in raws],
            **extra}


def test_karpathy_restval_goes_to_train_and_messy_entries_are_counted(tmp_path):
    images = tmp_path / "images"
    make_images(images, "a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg")
    split_file = tmp_path / "dataset_flickr30k.json"
    split_file.write_text(json.dumps({"dataset": "flickr30k", "images": [
        karpathy_entry("a.jpg", "train", "a one", "a two"),
        karpathy_entry("b.jpg", "restval", "b one"),
        karpathy_entry("c.jpg", "val", "c one"),
        karpathy_entry("d.jpg", "test", "d one", " "),
        {"filename": "e.jpg", "split": "train", "sentences": [{"tokens": ["e", "tokens"]}]},   # no raw
        karpathy_entry("f.jpg", "holiday", "f one"),
        karpathy_entry("../a.jpg", "train", "escapes"),
        karpathy_entry("gone.jpg", "train", "missing"),
        {"split": "train", "sentences": [{"raw": "no file name"}]}]}))
    train, messages = load_quietly(load_karpathy, images, "train", split_file)
    assert captions_of(train) == {"a.jpg": ["a one", "a two"], "b.jpg": ["b one"], "e.jpg": ["e tokens"]}
    assert train[0].path == str(images / "a.jpg")
    assert messages == ["Karpathy train: skipped 1 entries without a filename, 1 images with an unknown "
                        "split, 1 file names outside the image folder, 1 missing images"]
    assert [r.image_id for r in load_quietly(load_karpathy, images, "restval", split_file)[0]] == ["b.jpg"]
    assert captions_of(load_quietly(load_karpathy, images, "dev", split_file)[0]) == {"c.jpg": ["c one"]}
    test, messages = load_quietly(load_karpathy, images, "test", split_file)
    assert captions_of(test) == {"d.jpg": ["d one"]} and "1 empty captions" in messages[0]
    with pytest.raises(ValueError, match=r"Karpathy split 'train2017': dataset_flickr30k.json has "
                                         r"train \| restval \| val \| test"):
        load_karpathy(images, "train2017", split_file)


def test_a_karpathy_file_without_val_holds_out_part_of_train(tmp_path):
    make_images(tmp_path, *[f"{i}.jpg" for i in range(10)])
    split_file = tmp_path / "mine.json"
    split_file.write_text(json.dumps({"images": [karpathy_entry(f"{i}.jpg", "train", f"photo {i}")
                                                 for i in range(10)]}))
    cfg = DataConfig(dataset="karpathy", data_root=str(tmp_path), karpathy_json=str(split_file))
    assert validation_split(cfg) is None
    train, val = load_splits(cfg, seed=0)
    assert (len(train), len(val)) == (9, 1)
    with pytest.raises(ValueError, match=r"Karpathy split 'test': mine.json has train"):
        load_split(cfg, "test")


def flickr8k_to_karpathy():
    spec = importlib.util.spec_from_file_location("flickr8k_to_karpathy", ROOT / "scripts" / "flickr8k_to_karpathy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.flickr8k_karpathy


def assert_karpathy_file_loads_as_flickr8k(flickr8k_root: Path, tmp_path: Path) -> None:
    split_file = tmp_path / "dataset_flickr8k.json"
    split_file.write_text(json.dumps(flickr8k_to_karpathy()(flickr8k_root)))
    for flickr_split, karpathy_split in [("train", "train"), ("dev", "val"), ("test", "test")]:
        expected, _ = load_quietly(load_flickr8k, flickr8k_root, flickr_split)
        records, _ = load_quietly(load_karpathy, flickr8k_root / "Images", karpathy_split, split_file)
        assert records == expected and expected                       # ids, paths, captions, order


def test_the_karpathy_flickr8k_file_gives_the_flickr8k_records(flickr8k_tiny, tmp_path):
    assert_karpathy_file_loads_as_flickr8k(flickr8k_tiny, tmp_path)


@pytest.mark.data
def test_the_karpathy_flickr8k_file_gives_the_flickr8k_records_on_the_real_data(shared_data, tmp_path):
    assert_karpathy_file_loads_as_flickr8k(shared_data / "flickr8k", tmp_path)


# ---- the command line ------------------------------------------------------------------------
def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "flickr8k", "--karpathy-json", "k.json"], "--karpathy-json is read with --dataset karpathy"),
    (["--dataset", "karpathy"], "--dataset karpathy needs --karpathy-json"),
    (["--dataset", "imagefolder", "--split", "test"], "no split 'test' (it has: train)"),
])
def test_data_option_mistakes_are_one_line(capsys, tmp_path, argv, message):
    make_images(tmp_path, "a.jpg")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.jpg", "text": "a photo"}])
    status, _, err = run(capsys, "evaluate", "--data-root", tmp_path, *argv)
    assert status == 2 and message in err and "Traceback" not in err


@pytest.fixture
def photo_folder(tmp_path, flickr8k_tiny) -> Path:
    """The tiny Flickr8k photos as an image folder: train/ with metadata.jsonl, test/ with
    metadata.csv (5 captions a photo, one a row), no validation split."""
    folder = tmp_path / "photos"
    records = [r for split in ("train", "dev", "test") for r in load_quietly(load_flickr8k, flickr8k_tiny, split)[0]]
    for split, chosen in [("train", records[:5]), ("test", records[5:7])]:
        (folder / split).mkdir(parents=True)
        rows = [(Path(r.path).name, c) for r in chosen for c in r.captions]
        for r in chosen:
            shutil.copy(r.path, folder / split)
        if split == "train":
            write_jsonl(folder / split / "metadata.jsonl", [{"file_name": n, "text": c} for n, c in rows])
        else:
            write_csv(folder / split / "metadata.csv", ["file_name", "text"], [list(row) for row in rows])
    return folder


@requires_java
def test_train_evaluate_and_caption_on_an_image_folder(photo_folder, tmp_path, capsys):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    data = ["--dataset", "imagefolder", "--data-root", photo_folder, "--cache-dir", cache, "--num-workers", 0]
    status, out, err = run(capsys, "prepare", *data)
    assert status == 0, err
    assert out.splitlines() == ["train: 4 of 4 images cached", "val: 1 of 1 images cached"]   # 1 held out
    cached = sorted(cache.iterdir())
    status, out, err = run(capsys, "train", *data, "--output", run_dir, "--epochs", 1, "--batch-size", 4,
                           "--embed-dim", 32, "--hidden-dim", 32, "--min-word-count", 1, "--warmup-steps", 0)
    assert status == 0, err
    assert sorted(cache.iterdir()) == cached                        # the same records: prepare's cache read
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_CIDEr" in m for m in metrics)                   # validated on the held-out photo

    scores_file = tmp_path / "test_scores.json"
    status, out, err = run(capsys, "evaluate", "--checkpoint", run_dir, "--dataset", "imagefolder",
                           "--data-root", photo_folder, "--split", "test", "--method", "greedy",
                           "--no-fast", "--json", scores_file)
    assert status == 0, err
    assert "imagefolder test: 2 images, greedy" in out
    written = json.loads(scores_file.read_text())
    assert written["dataset"] == "imagefolder" and written["split"] == "test"
    assert sorted(written["captions"]) == sorted(f"test/{p.name}" for p in (photo_folder / "test").glob("*.jpg"))
    assert set(written["scores"]) >= {"BLEU-4", "CIDEr"}

    # the metadata files beside the photos are not images: ignored, not error rows
    status, out, err = run(capsys, "caption", photo_folder / "train", photo_folder / "test", "--checkpoint",
                           run_dir, "--no-fast", "--quiet", "--method", "greedy")
    rows = [json.loads(line) for line in out.splitlines()]
    assert status == 0, err
    assert sorted(Path(r["image"]).name for r in rows) == sorted(
        p.name for split in ("train", "test") for p in (photo_folder / split).glob("*.jpg"))
    assert all(r["caption"] for r in rows)
