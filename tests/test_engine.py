"""The one inference engine: the same photo and options give the same caption from the Python API,
the batch CLI and the web UI, in any batch; a bad image in a list raises naming it or gets an
error entry, as asked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captioner.api import MIN_DECODE_ROWS, Captioner
from captioner.cli import main
from captioner.preprocess import ImageLoadError, NotAnImage
from captioner.webapp import CaptionService

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(str(p) for p in (ROOT / "examples").glob("*.jpg"))


@pytest.fixture(scope="module")
def fast_captioner(tiny_checkpoint) -> Captioner:
    """As the CLI and the web UI load it: ONNX Runtime CNN."""
    return Captioner.load(tiny_checkpoint)


def photos(flickr8k_tiny) -> list[str]:
    return EXAMPLES + sorted(str(p) for p in (flickr8k_tiny / "Images").glob("*.jpg"))


def test_decoding_rows_do_not_depend_on_the_batch(tiny_captioner):
    """Each row's log-probs are bitwise the same alone, in a few rows, or in many."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(20, tiny_captioner.model_cfg.feature_dim, generator=generator)
    tokens = torch.randint(4, len(tiny_captioner.vocab), (20,), generator=generator)
    with torch.inference_mode():
        state = tiny_captioner.start_state(features)
        everything, _ = tiny_captioner.step(tokens, state)
        for rows in (1, 2, 3, MIN_DECODE_ROWS - 1, MIN_DECODE_ROWS, 11):
            alone = torch.cat([tiny_captioner.step(tokens[i:i + rows],
                                                   tiny_captioner.start_state(features[i:i + rows]))[0]
                               for i in range(0, 20, rows)])                      # (20, V)
            assert torch.equal(alone, everything), rows


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_same_captions_whatever_the_batch_size(fast_captioner, flickr8k_tiny, method):
    images = photos(flickr8k_tiny)
    reference = [(c.text, c.logprob) for c in fast_captioner.caption(images, method=method, beam_size=3,
                                                                      batch_size=len(images))]
    for batch_size in (1, 3, 5):
        again = fast_captioner.caption(images, method=method, beam_size=3, batch_size=batch_size)
        assert [(c.text, c.logprob) for c in again] == reference
    one_by_one = [fast_captioner.caption(p, method=method, beam_size=3) for p in images[:3]]
    assert [(c.text, c.logprob) for c in one_by_one] == reference[:3]


def test_seeded_sampling_does_not_depend_on_the_batch(fast_captioner, flickr8k_tiny):
    images = photos(flickr8k_tiny)[:5]
    together = fast_captioner.caption(images, method="sample", seed=7, batch_size=5)
    alone = [fast_captioner.caption(p, method="sample", seed=7) for p in images]
    assert [c.text for c in together] == [c.text for c in alone]


def test_api_cli_and_web_ui_give_identical_captions(fast_captioner, tiny_checkpoint, flickr8k_tiny,
                                                    tmp_path, capsys):
    images = photos(flickr8k_tiny)
    api = [c.text for c in fast_captioner.caption(images, method="beam", beam_size=3)]
    out = tmp_path / "out.jsonl"
    assert main(["caption", *images, "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--method",
                 "beam", "--beam-size", "3", "--batch-size", "4", "--workers", "2", "--quiet"]) == 0
    cli = {row["image"]: row["caption"] for row in map(json.loads, out.read_text().splitlines())}
    service = CaptionService(fast_captioner)
    web = [service.caption(image, method="beam", beam_size=3, num_captions=1).caption for image in images]
    assert [cli[image] for image in images] == api == web
    assert len(set(api)) > 2 and all(api)


def test_a_bad_image_in_a_list_raises_naming_it_or_gets_an_error_entry(fast_captioner, flickr8k_tiny,
                                                                      tmp_path):
    good = photos(flickr8k_tiny)[:3]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    images = [good[0], str(bad), good[1], str(tmp_path / "missing.jpg"), good[2]]
    with pytest.raises(NotAnImage, match=r"notes\.jpg: not an image") as caught:
        fast_captioner.caption(images)
    assert caught.value.source == str(bad)
    results = fast_captioner.caption(images, on_error="skip", batch_size=2)
    assert [r.ok for r in results] == [True, False, True, False, True]
    assert [r.image for r in results] == images
    assert results[1].error.startswith("not an image") and results[1].text == ""
    assert results[3].error == "no such file or directory"
    assert [r.text for r in results if r.ok] == [c.text for c in fast_captioner.caption(good)]
    with pytest.raises(ImageLoadError, match="missing.jpg: no such file"):
        fast_captioner.caption(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="on_error"):
        fast_captioner.caption(good, on_error="ignore")


def test_caption_stream_yields_in_input_order(fast_captioner, flickr8k_tiny):
    images = photos(flickr8k_tiny)
    streamed = fast_captioner.caption_stream(images, method="greedy", batch_size=2)
    assert next(streamed).image == images[0]
    assert [c.image for c in streamed] == images[1:]


def test_one_pixel_limit_for_paths_and_pil_images(fast_captioner, tmp_path):
    """The same admission everywhere: MAX_PIXELS from a file's header, and for an image in memory."""
    from PIL import Image

    from captioner.preprocess import MAX_PIXELS, ImageTooLarge

    side = int(MAX_PIXELS ** 0.5) + 1
    big = Image.new("1", (side, side))                       # 1 bit a pixel: 8 MB in memory
    with pytest.raises(ImageTooLarge, match=f"{side}x{side}"):
        fast_captioner.caption(big)
    big.save(tmp_path / "big.png")
    (result,) = fast_captioner.caption([tmp_path / "big.png"], on_error="skip")
    assert isinstance(result.failure, ImageTooLarge) and result.failure.size == (side, side)
