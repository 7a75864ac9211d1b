"""The shipped model (checkpoints/model.safetensors): it loads with no path and no network, and
captions real photos with the words a person would use for them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from captioner import Captioner
from captioner.api import default_checkpoint

PHOTOS = Path(__file__).parent / "fixtures" / "flickr8k_tiny" / "Images"
# photo -> any of these content words must appear (Flickr8k test/train photos, see fixtures)
EXPECTED = {
    "2513260012_03d33305cf.jpg": {"dog", "dogs"},            # two dogs in the snow
    "2654514044_a70a6e2c21.jpg": {"dog", "dogs"},
    "488416045_1c6d903fe0.jpg": {"dog", "dogs"},
    "1258913059_07c613f7ff.jpg": {"people", "man", "woman", "men", "women"},  # people at a table
}


@pytest.fixture(scope="module")
def shipped():
    return Captioner.load()


def test_default_checkpoint_is_the_shipped_file():
    path = default_checkpoint()
    assert path.is_file() and path.suffix == ".safetensors"
    assert path.stat().st_size < 30 * 2**20


def test_shipped_model_describes_its_header(shipped):
    assert shipped.model_cfg.backbone == "efficientnet_lite1"
    assert shipped.preprocess_cfg.image_size == 240 and shipped.preprocess_cfg.resize == "center_crop"
    assert shipped.decode_cfg.method == "beam" and shipped.decode_cfg.beam_size == 3
    # Round three's model reaches issue 9's bar on test (round one's: 0.203 / 0.196 / 0.474), as
    # measured by `captioner evaluate` and recorded in the header by the recipe.
    scores = shipped.info["test_scores"]
    assert scores["BLEU-4"] >= 0.215 and scores["METEOR"] >= 0.203 and scores["CIDEr"] >= 0.52


def test_shipped_cnn_has_its_top_fine_tuned_and_the_rest_is_imagenets(shipped):
    """The recipe fine-tunes the last 3 blocks and the head of Lite1 (--fine-tune-top 3); batch
    norm statistics and everything below stay as ImageNet trained them (compared at the fp16
    precision the checkpoint stores)."""
    from captioner.encoder import build_backbone

    pretrained = build_backbone("efficientnet_lite1").module.state_dict()
    tuned = shipped.encoder.state_dict()
    changed = {k for k in tuned if not tuned[k].half().equal(pretrained[k].half())}
    top = ("net._blocks.18.", "net._blocks.19.", "net._blocks.20.", "net._conv_head.", "net._bn1.")
    assert changed and all(k.startswith(top) and "running" not in k for k in changed), sorted(changed)


@pytest.mark.parametrize("name,words", sorted(EXPECTED.items()))
def test_shipped_model_names_what_is_in_the_photo(shipped, name, words):
    caption = shipped.caption(str(PHOTOS / name))
    assert set(caption.words) & words, f"{name}: {caption.text!r} has none of {sorted(words)}"
    assert len(caption.words) >= 4 and caption.score < 0


def test_cli_uses_the_shipped_model_by_default(tmp_path):
    out = tmp_path / "captions.jsonl"
    photo = PHOTOS / "2513260012_03d33305cf.jpg"
    result = subprocess.run([sys.executable, "-m", "captioner", "caption", str(photo), "-o", str(out),
                             "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())
    assert row["image"] == str(photo) and "dog" in row["caption"]
