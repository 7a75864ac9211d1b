"""Caption datasets (Flickr8k, COCO via pycocotools, Karpathy's split files, a folder of your own
photos in Hugging Face's imagefolder layout) and the token dataset the decoder trains on (the
feature cache of a frozen CNN is in features.py).

Messy data is expected: images that are missing or unreadable, captions that point to no image,
rows that cannot be parsed or name a file outside the dataset's folder are skipped and counted in
ONE warning per split, never a crash.
"""
from __future__ import annotations

import csv
import json
import os
import random
import warnings
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import DATASETS, DataConfig
from .vocab import Vocabulary


@dataclass
class ImageCaptions:
    image_id: str            # stable id: the COCO image id for COCO, else the file's path in the dataset
    path: str
    captions: list[str]


FLICKR_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                      "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def warn_skipped(source: str, counts: dict[str, int]) -> None:
    counts = {k: v for k, v in counts.items() if v}
    if counts:
        detail = ", ".join(f"{n} {what}" for what, n in counts.items())
        warnings.warn(f"{source}: skipped {detail}", stacklevel=3)


def load_flickr8k(root: str | os.PathLike, split: str = "train") -> list[ImageCaptions]:
    """Flickr8k layout: Images/, Flickr8k.token.txt, Flickr_8k.{train,dev,test}Images.txt."""
    root = Path(root)
    if split not in FLICKR_SPLIT_FILES:
        raise ValueError(f"unknown Flickr8k split {split!r} (train | dev | test)")
    token_file, split_file = root / "Flickr8k.token.txt", root / FLICKR_SPLIT_FILES[split]
    for needed in (token_file, split_file, root / "Images"):
        if not needed.exists():
            raise FileNotFoundError(f"Flickr8k: {needed} not found (see data/README.md)")
    wanted = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    wanted_set = set(wanted)
    on_disk = set(os.listdir(root / "Images"))
    captions: dict[str, list[str]] = defaultdict(list)
    skipped = {"malformed caption lines": 0, "captions that point to no image": 0}
    for line in token_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        key, _, text = line.partition("\t")
        name = key.rsplit("#", 1)[0]
        if not text.strip():
            skipped["malformed caption lines"] += 1
        elif name in wanted_set:
            captions[name].append(text.strip())
        elif name not in on_disk:
            # e.g. the real line "2258277193_586949ec62.jpg.1#0"; a wanted image that is absent
            # is counted once as a missing image by keep_existing instead.
            skipped["captions that point to no image"] += 1
    return keep_existing(
        [ImageCaptions(n, str(root / "Images" / n), captions[n]) for n in wanted],
        f"Flickr8k {split}", skipped)


def keep_existing(records: list[ImageCaptions], source: str,
                  skipped: dict[str, int] | None = None) -> list[ImageCaptions]:
    """Drop records without captions or without an image file; one warning with the counts."""
    skipped = dict(skipped or {})
    kept = []
    for r in records:
        if not r.captions:
            skipped["images without captions"] = skipped.get("images without captions", 0) + 1
        elif not os.path.isfile(r.path):
            skipped["missing images"] = skipped.get("missing images", 0) + 1
        else:
            kept.append(r)
    warn_skipped(source, skipped)
    return kept


def load_coco(root: str | os.PathLike, split: str = "train2017",
              karpathy_json: str | os.PathLike | None = None) -> list[ImageCaptions]:
    """COCO captions.

    Without karpathy_json: `root/annotations/captions_<split>.json` read with pycocotools, images
    in `root/<split>/`. With karpathy_json (dataset_coco.json), `split` is a Karpathy split name
    (train | val | test | restval; "train" includes restval as usual) and `filepath/filename`
    entries are resolved under root.
    """
    root = Path(root)
    if karpathy_json:
        return load_karpathy(root, split, karpathy_json)
    from pycocotools.coco import COCO

    annotation_file = root / "annotations" / f"captions_{split}.json"
    if not annotation_file.is_file():
        present = sorted(f.stem.removeprefix("captions_") for f in root.glob("annotations/captions_*.json"))
        raise FileNotFoundError(f"COCO: {annotation_file} not found (splits there: "
                                f"{' | '.join(present) or 'none'}; see data/README.md)")
    with quiet_stdout():
        coco = COCO(str(annotation_file))
    by_image: dict[int, list[str]] = defaultdict(list)
    skipped = {"captions that point to no image": 0, "empty captions": 0}
    for ann in coco.dataset.get("annotations", []):
        caption = str(ann.get("caption") or "").strip()
        if ann.get("image_id") not in coco.imgs:
            skipped["captions that point to no image"] += 1
        elif not caption:
            skipped["empty captions"] += 1
        else:
            by_image[ann["image_id"]].append(caption)
    records = [ImageCaptions(str(img_id), str(root / split / info["file_name"]), by_image[img_id])
               for img_id, info in sorted(coco.imgs.items())]
    return keep_existing(records, f"COCO {split}", skipped)


# Karpathy's split names; "train" includes restval, as in Karpathy's code (113,287 COCO images).
KARPATHY_SPLITS = {"train": {"train", "restval"}, "restval": {"restval"}, "val": {"val"},
                   "test": {"test"}}
KARPATHY_SPLIT_VALUES = set().union(*KARPATHY_SPLITS.values())     # what an entry's "split" may be


def load_karpathy(root: str | os.PathLike, split: str, karpathy_json: str | os.PathLike
                  ) -> list[ImageCaptions]:
    """Karpathy's split files (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json):
    `images[]` with `filename`, optional `filepath` (both under root), `split` (train | val | test |
    restval) and `sentences[].raw`. `split` is one of those names ("train" = train + restval;
    "validation" and "dev" mean val)."""
    root = Path(root)
    images = read_karpathy(karpathy_json)
    name = split if split in KARPATHY_SPLITS else split_name(split)
    present = karpathy_splits(images)
    if name not in present:
        raise ValueError(f"Karpathy split {split!r}: {Path(karpathy_json).name} has "
                         f"{' | '.join(present) or 'no images in a known split'}")
    skipped = Counter(dict.fromkeys(("entries without a filename", "images with an unknown split",
                                     "file names outside the image folder", "empty captions"), 0))
    records = []
    for image in images:
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            skipped["entries without a filename"] += 1
            continue
        if image.get("split") not in KARPATHY_SPLIT_VALUES:
            skipped["images with an unknown split"] += 1
            continue
        if image["split"] not in KARPATHY_SPLITS[name]:
            continue
        folder = image.get("filepath") or ""
        relative = inside_folder(f"{folder}/{image['filename']}" if folder else image["filename"])
        if relative is None:
            skipped["file names outside the image folder"] += 1
            continue
        captions = []
        for sentence in image.get("sentences") or []:
            text = sentence_text(sentence)
            if text:
                captions.append(text)
            else:
                skipped["empty captions"] += 1
        image_id = str(image["cocoid"]) if "cocoid" in image else relative.as_posix()
        records.append(ImageCaptions(image_id, str(karpathy_image_path(root, relative, image)), captions))
    return keep_existing(records, f"Karpathy {name}", skipped)


def read_karpathy(karpathy_json: str | os.PathLike) -> list:
    path = Path(karpathy_json)
    if not path.is_file():
        raise FileNotFoundError(f"Karpathy split file {path} not found (see data/README.md)")
    try:
        images = json.loads(path.read_text(encoding="utf-8")).get("images")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: not a Karpathy split file ({exc})") from None
    if not isinstance(images, list):
        raise ValueError(f"{path}: not a Karpathy split file (no images list)")
    return images


def karpathy_splits(images: list) -> list[str]:
    """The split names a Karpathy file's images can be loaded by."""
    present = {image.get("split") for image in images if isinstance(image, dict)}
    return [name for name, members in KARPATHY_SPLITS.items() if members & present]


def sentence_text(sentence) -> str:
    if not isinstance(sentence, dict):
        return ""
    raw = sentence.get("raw")
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    tokens = sentence.get("tokens")
    return " ".join(t for t in tokens if isinstance(t, str)).strip() if isinstance(tokens, list) else ""


def karpathy_image_path(root: Path, relative: PurePosixPath, image: dict) -> Path:
    """The split file names COCO 2014 files (val2014/COCO_val2014_<id>.jpg); COCO 2017 has the same
    photos renamed <cocoid:012d>.jpg and regrouped into train2017/ and val2017/, found by cocoid."""
    path = root / relative
    if path.is_file() or not isinstance(image.get("cocoid"), int):
        return path
    for folder in ("train2017", "val2017"):
        candidate = root / folder / f"{image['cocoid']:012d}.jpg"
        if candidate.is_file():
            return candidate
    return path


def inside_folder(name: str) -> PurePosixPath | None:
    """A dataset's file name as a relative path, or None when it would leave the dataset's folder
    (absolute, a drive, `..`): a metadata row must not point training at ../other or /etc/passwd."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or PureWindowsPath(name).drive or ".." in path.parts or path.name in ("", "."):
        return None
    return path


# ---------------------------------------------------------------------------------------------
# A folder of your own: Hugging Face's imagefolder layout
# How people name their splits (the keywords of Hugging Face's imagefolder) -> the names used here.
SPLIT_NAMES = {"train": "train", "training": "train",
               "val": "val", "validation": "val", "valid": "val", "dev": "val",
               "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption", "captions")


def split_name(name: str) -> str | None:
    return SPLIT_NAMES.get(str(name).strip().lower())


def load_imagefolder(root: str | os.PathLike, split: str = "train") -> list[ImageCaptions]:
    """Photos with `metadata.jsonl` or `metadata.csv` rows: `file_name` (relative to the metadata's
    folder) and the caption in `text` or `caption` (an image may have many rows) or `captions` (a
    list). Splits are subfolders (train/, validation/ or val/ or dev/, test/), each with its own
    metadata, or a `split` column in one DIR/metadata file, or neither: then all is train."""
    root = Path(root)
    splits, skipped = read_imagefolder(root)
    name = split_name(split)
    if name not in splits:
        raise ValueError(f"imagefolder {root}: no split {split!r} (it has: {' | '.join(splits) or 'none'})")
    return keep_existing(list(splits[name].values()), f"imagefolder {name}", skipped)


def imagefolder_splits(root: str | os.PathLike) -> list[str]:
    return list(read_imagefolder(Path(root))[0])


def read_imagefolder(root: Path) -> tuple[dict[str, dict[str, ImageCaptions]], Counter]:
    """Every split's records (train, val, test order; images in order of first mention, keyed by
    their path under root) and the counts of rows skipped."""
    skipped = Counter(dict.fromkeys(("malformed rows", "rows without file_name", "file names outside the folder",
                                     "rows with an unknown split", "rows without a caption", "empty captions"), 0))
    splits: dict[str, dict[str, ImageCaptions]] = {name: {} for name in ("train", "val", "test")}
    for metadata, folder_split in metadata_files(root):
        folder = metadata.parent
        for row in metadata_rows(metadata, skipped):
            relative = inside_folder(str(row.get("file_name") or ""))
            if not isinstance(row.get("file_name"), str) or not row["file_name"].strip():
                skipped["rows without file_name"] += 1
            elif relative is None:
                skipped["file names outside the folder"] += 1
            elif (split := folder_split or row_split(row, relative)) is None:
                skipped["rows with an unknown split"] += 1
            elif (captions := row_captions(row)) is None:
                skipped["rows without a caption"] += 1
            else:
                key = (folder / relative).relative_to(root).as_posix()
                record = splits[split].setdefault(key, ImageCaptions(key, str(folder / relative), []))
                record.captions += [c for c in captions if c]
                skipped["empty captions"] += sum(1 for c in captions if not c)
    return {name: records for name, records in splits.items() if records}, skipped


def metadata_files(root: Path) -> list[tuple[Path, str | None]]:
    """(metadata file, the split its folder names or None for root's own file)."""
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: {root} is not a folder")
    in_split_folders = [(metadata_file(folder), split_name(folder.name)) for folder in sorted(root.iterdir())
                        if folder.is_dir() and split_name(folder.name)]
    in_split_folders = [(file, split) for file, split in in_split_folders if file]
    top = metadata_file(root)
    if top and in_split_folders:
        raise ValueError(f"imagefolder {root}: both {top.name} and {in_split_folders[0][0].relative_to(root)}: "
                         "use one metadata file with a split column, or one per split folder")
    if top:
        return [(top, None)]
    if not in_split_folders:
        raise FileNotFoundError(f"imagefolder: no metadata.jsonl or metadata.csv in {root} or in split "
                                "folders train/, validation/, test/ (see data/README.md)")
    return in_split_folders


def metadata_file(folder: Path) -> Path | None:
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"imagefolder {folder}: both metadata.jsonl and metadata.csv; keep one")
    return found[0] if found else None


def metadata_rows(path: Path, skipped: Counter) -> Iterator[dict]:
    """The rows of metadata.jsonl (one JSON object a line) or metadata.csv (a header, then one row a
    line: a caption holding a comma must be quoted). Rows that do not parse are counted in skipped."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    lines = [line.rstrip("\r") for line in lines if line.strip()]
    if path.suffix == ".jsonl":
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                yield row
            else:
                skipped["malformed rows"] += 1
        return
    header = [name.strip() for name in next(csv.reader(lines[:1]), [])]
    if "file_name" not in header or not set(CAPTION_COLUMNS) & set(header):
        raise ValueError(f"{path}: needs a file_name column and a caption column (text, caption or "
                         f"captions); it has {', '.join(header) or 'no header'}")
    for line in lines[1:]:
        try:
            [fields] = csv.reader([line], strict=True)
        except csv.Error:
            fields = None
        if fields is None or len(fields) != len(header):
            skipped["malformed rows"] += 1
            continue
        yield dict(zip(header, fields))


def row_split(row: dict, relative: PurePosixPath) -> str | None:
    """A row of root's metadata file: its split column, else the split folder its file is in, else train."""
    if "split" in row:
        return split_name(row["split"])
    first = relative.parts[0]
    return split_name(first) if len(relative.parts) > 1 and split_name(first) else "train"


def row_captions(row: dict) -> list[str] | None:
    """The row's captions, stripped ("" for an empty one), or None without a caption column."""
    column = next((c for c in CAPTION_COLUMNS if c in row), None)
    if column is None:
        return None
    value = row[column]
    if column == "captions" and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)                       # a list in a CSV cell
        except ValueError:
            return None
    values = value if isinstance(value, list) else [value]
    return [v.strip() if isinstance(v, str) else "" for v in values]


def load_split(cfg: DataConfig, split: str) -> list[ImageCaptions]:
    """One split of the dataset cfg describes, by the dataset's own split name."""
    if cfg.dataset == "flickr8k":
        return load_flickr8k(cfg.data_root, split)
    if cfg.dataset == "coco":
        return load_coco(cfg.data_root, split, cfg.karpathy_json)
    if cfg.dataset == "karpathy":
        if not cfg.karpathy_json:
            raise ValueError("--dataset karpathy needs --karpathy-json (dataset_flickr8k.json, ...)")
        return load_karpathy(cfg.data_root, split, cfg.karpathy_json)
    if cfg.dataset == "imagefolder":
        return load_imagefolder(cfg.data_root, split)
    raise ValueError(f"unknown dataset {cfg.dataset!r} ({' | '.join(DATASETS)})")


def validation_split(cfg: DataConfig) -> str | None:
    """cfg.val_split, or else the dataset's own validation split (Flickr8k's dev; val of a Karpathy
    file or an image folder that has one); None: hold out part of train."""
    if cfg.val_split:
        return cfg.val_split
    if cfg.dataset == "flickr8k":
        return "dev"
    if cfg.dataset == "imagefolder":
        return "val" if "val" in imagefolder_splits(cfg.data_root) else None
    if cfg.karpathy_json:
        return "val" if "val" in karpathy_splits(read_karpathy(cfg.karpathy_json)) else None
    return None


class quiet_stdout:
    """pycocotools prints progress to stdout, which would corrupt JSON Lines on stdout."""

    def __enter__(self):
        import contextlib
        import io
        self._ctx = contextlib.redirect_stdout(io.StringIO())
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def holdout_split(records: list[ImageCaptions], fraction: float, seed: int = 0
                  ) -> tuple[list[ImageCaptions], list[ImageCaptions]]:
    """Deterministically hold out a part of train for validation (at least one image)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * fraction))) if len(records) > 1 else 0
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])


# ---------------------------------------------------------------------------------------------
# Token dataset for the decoder
class CaptionTokens(Dataset):
    """(feature row, caption token ids) pairs: one item per caption of every readable image.

    Held in three flat arrays (every caption's ids end to end, where each starts, its image's row)
    rather than a Python list per caption, which costs ~220 bytes a caption in every process:
    ~125 MB per rank for COCO's 566k captions, against ~35 MB as arrays."""

    def __init__(self, records: list[ImageCaptions], vocab: Vocabulary, max_len: int,
                 usable: np.ndarray | None = None):
        ids, starts, rows = array("i"), array("q", [0]), array("i")
        for row, record in enumerate(records):
            if usable is not None and not usable[row]:
                continue
            for caption in record.captions:
                ids.extend(vocab.encode(caption, max_len))
                starts.append(len(ids))
                rows.append(row)
        self.ids = np.frombuffer(ids, np.int32)            # (total ids,)
        self.starts = np.frombuffer(starts, np.int64)      # (captions + 1,): caption i is ids[starts[i]:starts[i + 1]]
        self.rows = np.frombuffer(rows, np.int32)          # (captions,)
        self.pad_id = vocab.pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, list[int]]:
        return int(self.rows[i]), self.ids[self.starts[i]:self.starts[i + 1]].tolist()


def pad_tokens(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_id, dtype=torch.long)   # (B, T)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
