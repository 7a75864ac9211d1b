"""The one image pipeline: every PIL mode, EXIF orientation, transparency, resize modes, odd sizes
and inputs that are not images."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.config import PreprocessConfig
from captioner.preprocess import ImageLoadError, is_image_file, open_image, preprocess, resize, to_rgb

CFG = PreprocessConfig(image_size=32)
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def gradient_rgb(width=48, height=32) -> Image.Image:
    """R grows left to right, G top to bottom, B constant: no two rows or columns are alike."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 90)], -1).astype(np.uint8), "RGB")


def grey(values: np.ndarray) -> np.ndarray:
    """(H, W) grey levels -> (H, W, 3) RGB array."""
    return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, axis=-1)


def ramp(top: float, dtype) -> np.ndarray:
    return np.linspace(0, top, 48 * 32).reshape(32, 48).astype(dtype)


def with_transparency_index() -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)     # 0 = red, 1 = blue
    image.paste(1, (4, 0, 8, 8))                              # right half: index 1
    image.info["transparency"] = 1
    return image


# mode -> (image in that mode, the RGB array to_rgb must give)
def mode_cases():
    base = gradient_rgb()
    base_rgb = np.asarray(base, dtype=np.float64)
    as_l = np.asarray(base.convert("L"), dtype=np.float64)
    la = base.convert("LA")
    i16 = ramp(65535, np.uint16)
    i32 = ramp(1000, np.int32)
    f32 = ramp(8, np.float32) - 3.0
    palette = base.convert("P")
    return {
        "1": (base.convert("1"), grey(np.asarray(base.convert("1"), dtype=np.float64) * 255)),
        "L": (base.convert("L"), grey(as_l)),
        "LA": (la, grey(as_l)),
        "P": (palette, np.asarray(palette.convert("RGB"), dtype=np.float64)),
        "P+transparency": (with_transparency_index(),
                           np.array([[RED] * 4 + [WHITE] * 4] * 8, dtype=np.float64)),
        "RGB": (base, base_rgb),
        "RGBA": (base.convert("RGBA"), base_rgb),
        "CMYK": (base.convert("CMYK"), base_rgb),
        "I": (Image.fromarray(i32), grey(i32 / 1000 * 255)),
        "I;16": (Image.fromarray(i16), grey(i16 / 65535 * 255)),
        "F": (Image.fromarray(f32), grey((f32 + 3) / 8 * 255)),
    }


MODES = mode_cases()


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_becomes_the_right_rgb(name):
    image, expected = MODES[name]
    assert image.mode == name.split("+")[0]
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    # 16-bit and float images must be rescaled, not clipped at 255 (PIL's own convert clips).
    assert np.abs(np.asarray(rgb, dtype=np.float64) - expected).max() <= 1.0


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_gives_a_normalised_tensor(name):
    image, _ = MODES[name]
    x = preprocess(image, CFG)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # mean = std = 0.5 maps [0, 1] to [-1, 1]
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    assert x.std() > 0.1, "the image content was lost"


def test_normalisation_uses_the_config():
    cfg = PreprocessConfig(image_size=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = preprocess(Image.new("RGB", (4, 4), (255, 0, 255)), cfg)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 0.5]))


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    image.putpixel((2, 0), (0, 0, 255, 0))       # fully transparent blue -> white
    image.putpixel((3, 0), (0, 0, 0, 128))       # half transparent black -> mid grey
    rgb = np.asarray(to_rgb(image)).astype(int)
    assert tuple(rgb[0, 0]) == RED and tuple(rgb[0, 2]) == WHITE
    assert np.all(np.abs(rgb[0, 3] - 127) <= 1)
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((1, 0), (0, 0))
    assert np.asarray(to_rgb(la)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def save_with_orientation(path, image: Image.Image, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif.tobytes())


def marked_image() -> Image.Image:
    """60x40, white, with a red block in the top-left corner."""
    image = Image.new("RGB", (60, 40), WHITE)
    image.paste(RED, (0, 0, 20, 10))
    return image


def red_centroid(image: Image.Image) -> tuple[float, float]:
    a = np.asarray(image).astype(int)
    ys, xs = np.nonzero((a[..., 0] > 200) & (a[..., 1] < 80))
    return xs.mean() / image.width, ys.mean() / image.height


@pytest.mark.parametrize("orientation, size, corner", [
    (1, (60, 40), (0, 0)),      # as stored
    (3, (60, 40), (1, 1)),      # rotated 180: block at bottom-right
    (6, (40, 60), (1, 0)),      # rotate 90 clockwise to view: block at top-right
    (8, (40, 60), (0, 1)),      # rotate 90 counter-clockwise: block at bottom-left
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, corner):
    path = tmp_path / "photo.jpg"
    save_with_orientation(path, marked_image(), orientation)
    upright = open_image(path)
    assert upright.size == size
    cx, cy = red_centroid(upright)
    assert abs(cx - corner[0]) < 0.35 and abs(cy - corner[1]) < 0.35, (cx, cy)


def test_exif_rotation_equals_rotating_the_pixels(tmp_path):
    path = tmp_path / "photo.jpg"
    save_with_orientation(path, marked_image(), 6)
    stored = Image.open(path).convert("RGB")                  # as stored, EXIF ignored
    # 90 degrees clockwise; rebuilt from the array so it carries no EXIF of its own
    expected = Image.fromarray(np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))
    assert np.array_equal(np.asarray(open_image(path)), np.asarray(expected))
    cfg = PreprocessConfig(image_size=40)   # >= the stored size: no JPEG draft scaling
    assert torch.equal(preprocess(path, cfg), preprocess(expected, cfg))
    # a PIL image opened by the caller is turned upright too
    assert np.array_equal(np.asarray(open_image(Image.open(path))), np.asarray(expected))


def stripes(width, height, colours) -> Image.Image:
    a = np.zeros((height, width, 3), np.uint8)
    edges = np.linspace(0, width, len(colours) + 1).astype(int)
    for colour, lo, hi in zip(colours, edges, edges[1:]):
        a[:, lo:hi] = colour
    return Image.fromarray(a)


def test_resize_squash_keeps_everything():
    out = np.asarray(resize(stripes(80, 40, [RED, BLUE]), PreprocessConfig(image_size=20)))
    assert out.shape == (20, 20, 3)
    assert (out[:, :9] == RED).all() and (out[:, 11:] == BLUE).all()


def test_resize_center_crop_keeps_the_middle():
    image = stripes(80, 40, [RED, GREEN, GREEN, BLUE])      # middle half green
    out = np.asarray(resize(image, PreprocessConfig(image_size=20, resize="center_crop")))
    assert out.shape == (20, 20, 3)
    assert (out[:, 1:-1] == GREEN).all()


def test_resize_pad_letterboxes():
    out = np.asarray(resize(Image.new("RGB", (80, 40), RED), PreprocessConfig(image_size=20, resize="pad")))
    assert out.shape == (20, 20, 3)
    assert (out[:5] == 127).all() and (out[15:] == 127).all()
    assert (out[5:15] == RED).all()


def test_unknown_resize_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize(Image.new("RGB", (4, 4)), PreprocessConfig(resize="stretch"))


@pytest.mark.parametrize("mode", ["squash", "center_crop", "pad"])
@pytest.mark.parametrize("size", [(1, 1), (4000, 12), (12, 4000), (60000, 12)])
def test_tiny_and_extreme_aspect_images(mode, size):
    x = preprocess(Image.new("RGB", size, RED), PreprocessConfig(resize=mode))
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()
    # squash and crop fill the square with the image; pad leaves grey bars around a strip
    red_share = ((x[0] > 0.99) & (x[1] < -0.99)).float().mean().item()
    expected = 1.0 if mode != "pad" or size == (1, 1) else 0.0
    assert abs(red_share - expected) < 0.02, red_share


def test_large_jpeg_decodes_at_reduced_size_without_changing_the_result(tmp_path):
    photo = gradient_rgb(1000, 800)
    photo.save(tmp_path / "big.jpg", quality=95)
    cfg = PreprocessConfig(image_size=224)
    fast = preprocess(tmp_path / "big.jpg", cfg)          # JPEG draft mode (DCT scaling)
    full = preprocess(photo, cfg)
    assert (fast - full).abs().mean() < 0.02


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_jpeg_in_other_modes(tmp_path, mode):
    gradient_rgb(600, 500).convert(mode).save(tmp_path / "photo.jpg")
    x = preprocess(tmp_path / "photo.jpg", PreprocessConfig(image_size=64))
    assert x.shape == (3, 64, 64) and x.std() > 0.1


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    gradient_rgb(200, 150).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, reason", [
    ("notes.jpg", b"this is not an image\n" * 20, "not a readable image"),
    ("empty.png", b"", "not a readable image"),
    ("truncated.jpg", jpeg_bytes()[:400], "not a readable image"),
])
def test_not_an_image_raises_image_load_error(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        preprocess(path, CFG)
    message = str(info.value)
    assert reason in message and "\n" not in message
    assert not is_image_file(path) or name == "truncated.jpg"


def test_missing_path_raises_image_load_error(tmp_path):
    with pytest.raises(ImageLoadError, match="No such file"):
        preprocess(tmp_path / "nowhere.jpg", CFG)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 10,000 px > 2 x the limit
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        preprocess(tmp_path / "bomb.png", CFG)


def test_is_image_file_sniffs_content_not_extension(tmp_path):
    (tmp_path / "photo.txt").write_bytes(jpeg_bytes())
    (tmp_path / "fake.jpg").write_text("hello")
    assert is_image_file(tmp_path / "photo.txt")
    assert not is_image_file(tmp_path / "fake.jpg")
    assert not is_image_file(tmp_path / "missing.jpg")
