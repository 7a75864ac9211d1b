"""coco-caption scores: score_captions must give exactly what pycocoevalcap's own scorers give."""
import pytest
from conftest import requires_java

from captioner.config import DecodeConfig
from captioner.datasets import ImageCaptions
from captioner.evaluate import METRIC_NAMES, caption_records, evaluate_records, score_captions

REFERENCES = {
    "dog.jpg": ["A brown dog is running through the grass.", "A dog runs across a lawn .",
                "The tan dog is running on green grass", "A dog running outside."],
    "people.jpg": ["Three people sit at a table under an umbrella.",
                   "People are sitting outside a cafe .", "A group of friends eat outdoors."],
    "dance.jpg": ["A man and a woman dance in costumes.", "Two people dancing in the street ."],
    "pool.jpg": ["A dog swims in a swimming pool.", "A small dog is swimming toward a person ."],
}
CANDIDATES = {
    "dog.jpg": "a brown dog runs on the grass",
    "people.jpg": "people sitting at a table outside",
    "dance.jpg": "a man and a woman dancing",
    "pool.jpg": "a dog is in the water",
}


def test_scores_equal_pycocoevalcap(coco_caption_scores):
    scores = score_captions(REFERENCES, CANDIDATES)
    assert list(scores) == list(METRIC_NAMES)
    expected = coco_caption_scores(REFERENCES, CANDIDATES)
    for name in METRIC_NAMES:
        assert scores[name] == pytest.approx(expected[name], abs=1e-9), name
    assert 0.3 < scores["BLEU-1"] < 1.0 and scores["CIDEr"] > 0.1   # real overlap, not perfect


@requires_java
def test_perfect_and_subset_metrics():
    perfect = {k: v[0] for k, v in REFERENCES.items()}
    scores = score_captions(REFERENCES, perfect, metrics=["BLEU-1", "ROUGE-L"])
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"}
    assert scores["BLEU-1"] == pytest.approx(1.0) and scores["ROUGE-L"] == pytest.approx(1.0)


def test_mismatched_ids_are_an_error():
    with pytest.raises(ValueError, match="same image ids"):
        score_captions(REFERENCES, {**CANDIDATES, "extra.jpg": "a cat"})
    missing = dict(CANDIDATES)
    missing.pop("pool.jpg")
    with pytest.raises(ValueError, match="same image ids"):
        score_captions(REFERENCES, missing)


def test_nothing_to_score_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="no captions to score"):
        score_captions({}, {})


def test_unreadable_images_are_left_out_with_one_warning(tiny_captioner, flickr8k_tiny, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    dog = flickr8k_tiny / "Images" / "2654514044_a70a6e2c21.jpg"
    records = [ImageCaptions("dog", str(dog), ["a dog"]), ImageCaptions("bad", str(bad), ["?"]),
               ImageCaptions("bad2", str(bad), ["?"])]
    cfg = DecodeConfig(method="greedy")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable images \(first: .*broken.jpg: not an image"):
        captions = caption_records(tiny_captioner, records, cfg, num_workers=0, progress=False)
    assert list(captions) == ["dog"] and captions["dog"]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 2 images could be read"):
        evaluate_records(tiny_captioner, records[1:], cfg, num_workers=0, progress=False)
