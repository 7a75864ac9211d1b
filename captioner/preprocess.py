"""The ONE image pipeline: training, evaluation, the CLI and the web UI all call `preprocess`.

It accepts every PIL mode (1, L, LA, P, RGBA, CMYK, I, I;16, F ...), applies the EXIF
orientation, flattens transparency onto white and resizes as the checkpoint's PreprocessConfig says.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import PreprocessConfig



class ImageLoadError(Exception):
    """An input that is not a readable image (the message says why, for one error row)."""


class ImageTooLarge(ImageLoadError):
    """Refused from the header, before decoding; size is (width, height) when the header gave it."""

    def __init__(self, message: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.size = size


def header_size(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the file header alone, no pixel decoded, so memory stays bounded
    whatever the file claims. Beyond max_pixels (default: Pillow's limit) -> ImageTooLarge.
    Pillow itself only warns between 1x and 2x its limit: that warning is a refusal here.
    Files that are not images raise as Image.open does."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
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


def is_image_file(path: str | os.PathLike) -> bool:
    """Recognise images by content (Pillow's format sniffing), not by extension."""
    try:
        with Image.open(Path(path)) as image:
            return image.format is not None
    except Exception:  # any failure to identify means "not an image we can read"
        return False
