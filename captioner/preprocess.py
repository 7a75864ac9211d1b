"""The ONE image pipeline: training, evaluation, the CLI and the web UI all call `preprocess`,
and every image that reaches a model passes the ONE admission check, `read_image`.

It accepts every PIL mode (1, L, LA, P, RGBA, CMYK, I, I;16, F ...), applies the EXIF
orientation, flattens transparency onto white and resizes as the checkpoint's PreprocessConfig says.
Admission refuses, with one error type (ImageLoadError and its kinds) and a one-line reason: files
that are not images, empty or unreadable files, and images over MAX_PIXELS, judged from the header
before any pixel is decoded (a decompression bomb never gets to allocate its gigabytes).
"""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from .config import PreprocessConfig

# The largest image admitted anywhere (API, CLI, web UI, training): a 61-megapixel camera's photo
# passes; a decompression bomb (a tiny file that decodes to gigabytes) is refused from its header.
MAX_PIXELS = 64_000_000


class ImageLoadError(Exception):
    """An input that cannot be captioned. `reason` says why in one line; `source` names the file
    once known (str() is then "source: reason")."""

    def __init__(self, reason: str, source: str | None = None):
        super().__init__(reason)
        self.reason, self.source = reason, source

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}" if self.source else self.reason

    def __reduce__(self):      # survives the trip back from a DataLoader worker
        return type(self), (self.reason, self.source)


class NotAnImage(ImageLoadError):
    """The content is no image format Pillow reads (or the file is empty)."""


class ImageTooLarge(ImageLoadError):
    """Refused from the header, before decoding; size is (width, height) when the header gave it."""

    def __init__(self, reason: str, size: tuple[int, int] | None = None, source: str | None = None):
        super().__init__(reason, source)
        self.size = size

    def __reduce__(self):
        return type(self), (self.reason, self.size, self.source)


def header_size(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the file header alone, no pixel decoded, so memory stays bounded
    whatever the file claims. Beyond max_pixels (default: MAX_PIXELS) -> ImageTooLarge.
    Pillow itself only warns between 1x and 2x its own limit: that warning is a refusal here.
    Files that are not images raise as Image.open does."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"refused before decoding: {exc}") from None
    if limit and width * height > limit:
        raise ImageTooLarge(f"refused: {width}x{height} pixels exceeds the limit of {limit} "
                            "(decompression bomb?)", (width, height))
    return width, height


def open_image(source, target_size: int | None = None) -> Image.Image:
    """Open a path or PIL image as an upright RGB image.

    target_size lets JPEG decoding use `draft` (DCT scaling): a 6000x4500 photo decodes at
    1/8 size in a fraction of the time, still at least target_size on each side.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            image = Image.open(source)
            if target_size and image.format == "JPEG":
                image.draft("RGB", (target_size, target_size))
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"image too large (decompression bomb): {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(f"not a readable image: {exc}") from None
    try:
        return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"not a readable image: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grey: scale the actual range to 8 bits (PIL's convert would clip at 255).
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        if image.mode == "F":
            low = float(values.min())
            values, top = values - low, max(float(values.max()) - low, 1e-6)
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    size = cfg.image_size
    width, height = image.size
    if cfg.resize == "squash":
        return image.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    if cfg.resize == "center_crop":
        # Scale only the centred square (box in source pixels): resizing the whole image first
        # turns a 60000x12 strip into a 1120000x224 intermediate (750 MB).
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side),
                            reducing_gap=3.0)
    if cfg.resize == "pad":
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size), (127, 127, 127))
        canvas.paste(image.resize(new, Image.BILINEAR, reducing_gap=3.0),
                     ((size - new[0]) // 2, (size - new[1]) // 2))
        return canvas
    raise ValueError(f"unknown resize mode {cfg.resize!r} (squash | center_crop | pad)")


def to_tensor(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB PIL image of the final size -> normalised float tensor (3, H, W)."""
    array = np.asarray(image, dtype=np.float32) / 255.0                    # (H, W, 3)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())  # (3, H, W)


def preprocess(source, cfg: PreprocessConfig) -> torch.Tensor:
    """Path or PIL image -> (3, S, S) tensor ready for the encoder."""
    return to_tensor(resize(open_image(source, cfg.image_size), cfg), cfg)


def read_image(source, cfg: PreprocessConfig, transform=None) -> torch.Tensor:
    """Admission + preprocessing of one path or PIL image: (3, S, S), or ImageLoadError (or a
    kind of it) with the reason. transform (optional) maps the admitted path or image to the
    PIL image to preprocess (e.g. a mirrored copy for training)."""
    if isinstance(source, Image.Image):
        width, height = source.size
        if width * height > MAX_PIXELS:
            raise ImageTooLarge(f"refused: {width}x{height} pixels exceeds the limit of {MAX_PIXELS}",
                                (width, height))
        return preprocess(source if transform is None else transform(source), cfg)
    path = os.fspath(source)
    if os.path.islink(path) and not os.path.exists(path):
        raise ImageLoadError(f"dangling symbolic link (to {os.readlink(path)})")
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ImageLoadError("is a directory")
        if not stat.S_ISREG(info.st_mode):      # reading a FIFO or a device could block forever
            raise ImageLoadError("not a regular file")
        if info.st_size == 0:
            raise NotAnImage("not an image: empty file")
        header_size(path)          # refuses a decompression bomb before decoding a pixel
        return preprocess(path if transform is None else transform(path), cfg)
    except UnidentifiedImageError:
        raise NotAnImage("not an image (no format Pillow reads recognises its content)") from None
    except FileNotFoundError:
        raise ImageLoadError("no such file or directory") from None
    except PermissionError:
        raise ImageLoadError("permission denied") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read: {exc.strerror or exc}") from None


class ImageInputs(Dataset):
    """The images of a job (paths or PIL images) for a DataLoader: item i -> (i, image (3, S, S),
    None) or (i, None, ImageLoadError). Every reader of images for a model uses it: inference
    (engine.py), the training feature cache and fine-tuning."""

    def __init__(self, items, cfg: PreprocessConfig, transform=None):
        self.items, self.cfg, self.transform = list(items), cfg, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return i, read_image(self.items[i], self.cfg, self.transform), None
        except ImageLoadError as exc:
            return i, None, exc
        except Exception as exc:  # one odd file must never stop a 10,000-image job
            return i, None, ImageLoadError(f"{type(exc).__name__}: {exc}")


def collate_images(items):
    """ImageInputs items -> (indices of the readable ones, their images stacked (B, 3, S, S) or
    None, [(index, ImageLoadError)] for the others)."""
    good = [(i, x) for i, x, err in items if err is None]
    errors = [(i, err) for i, x, err in items if err is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, errors


def is_image_file(path: str | os.PathLike) -> bool:
    """Recognise images by content (Pillow's format sniffing), not by extension."""
    try:
        with Image.open(Path(path)) as image:
            return image.format is not None
    except Exception:  # any failure to identify means "not an image we can read"
        return False
