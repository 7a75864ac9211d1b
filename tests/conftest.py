"""Shared test fixtures: paths to the shipped fixtures and ../shared/data, and ONE small trained
checkpoint built per session (EfficientNet-Lite0 with its real weights + a hidden-64 decoder).

Other test modules reuse:
  shared_data          path of ../shared/data; skips the test (with the reason) when absent
  SHARED, FIXTURES     the same paths as constants, for `pytest.mark.skipif(not SHARED.is_dir(), ...)`
  flickr8k_tiny        tests/fixtures/flickr8k_tiny (8 real photos, real captions, messy cases)
  coco_tiny            tests/fixtures/coco_tiny (6 small COCO photos, COCO + Karpathy JSON)
  tiny_checkpoint      path of a .safetensors checkpoint trained briefly on flickr8k_tiny
  coco_caption_scores  pycocoevalcap's scorers called directly (the reference for score_captions);
                       skips without Java
  tiny_captioner       that checkpoint loaded with the eager (reference) encoder; session-wide,
                       so do not modify it
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from captioner.api import Captioner
from captioner.config import ModelConfig
from captioner.datasets import load_flickr8k
from captioner.model import caption_loss
from captioner.vocab import Vocabulary

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
SHARED = TESTS.parent.parent / "shared" / "data"
SHARED_REASON = f"needs the real datasets in {SHARED} (absent: only on the development machines)"

requires_shared_data = pytest.mark.skipif(not SHARED.is_dir(), reason=SHARED_REASON)
JAVA_REASON = ("METEOR and the PTB tokenizer need Java (apt-get install default-jre-headless; "
               "`make test` installs it)")
# `make test` (and so CI) installs Java and sets CAPTIONER_REQUIRE_JAVA=1: there these tests run,
# and fail loudly if Java is missing, instead of skipping in silence.
JAVA_MISSING = shutil.which("java") is None and not os.environ.get("CAPTIONER_REQUIRE_JAVA")
requires_java = pytest.mark.skipif(JAVA_MISSING, reason=JAVA_REASON)

# One intra-op thread: on 2 shared cores, torch's second OpenMP thread spin-waits against the
# other processes and small ops run 10-40x slower (measured: 60 decoder steps 1.2 s vs 44 s CPU).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(SHARED_REASON)
    return SHARED


@pytest.fixture(scope="session")
def flickr8k_tiny() -> Path:
    return FIXTURES / "flickr8k_tiny"


@pytest.fixture(scope="session")
def coco_tiny() -> Path:
    return FIXTURES / "coco_tiny"


def tiny_records(root: Path):
    """All three splits of the tiny Flickr8k fixture (its messy-case warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [r for split in ("train", "dev", "test") for r in load_flickr8k(root, split)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, flickr8k_tiny) -> Path:
    """Lite0 (pretrained, offline) + a small decoder fitted for a few seconds to the fixture's
    captions, so its greedy captions are real sentences about the fixture photos."""
    records = tiny_records(flickr8k_tiny)
    vocab = Vocabulary.build([c for r in records for c in r.captions], min_count=2)
    cfg = ModelConfig(embed_dim=32, hidden_dim=64, dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        captioner = Captioner.create(cfg, vocab, pretrained=True)
        images = torch.stack([captioner.preprocess(r.path) for r in records])   # (N, 3, S, S)
        features = captioner.encode(images)                                      # (N, D)
        rows, captions = zip(*[(i, vocab.encode(c)) for i, r in enumerate(records)
                               for c in r.captions])
        tokens = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(c) for c in captions], batch_first=True, padding_value=vocab.pad_id)
        decoder = captioner.decoders[0].train()
        optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
        for _ in range(60):
            loss = caption_loss(decoder(features[list(rows)], tokens), tokens, vocab.pad_id)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    decoder.eval()
    return captioner.save(tmp_path_factory.mktemp("tiny_checkpoint") / "model.safetensors",
                          info={"trained_on": "flickr8k_tiny", "loss": loss.item()})


@pytest.fixture(scope="session")
def tiny_captioner(tiny_checkpoint) -> Captioner:
    return Captioner.load(tiny_checkpoint, fast=False)


@pytest.fixture(scope="session")
def coco_caption_scores():
    """The coco-caption recipe written out with pycocoevalcap itself (PTBTokenizer, Bleu(4),
    Meteor, Rouge, Cider; no SPICE): what score_captions must equal.

    METEOR's Java process takes ~6 s of CPU to start, so this shares the one that
    captioner.evaluate keeps per process; it is pycocoevalcap's own Meteor, as checked here."""
    if JAVA_MISSING:
        pytest.skip(JAVA_REASON)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from captioner.evaluate import meteor_scorer

    assert type(meteor_scorer()) is Meteor

    def scores(references: dict, candidates: dict) -> dict:
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
        res = tokenizer.tokenize({k: [{"caption": v}] for k, v in candidates.items()})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        return {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
                "METEOR": meteor_scorer().compute_score(gts, res)[0],
                "ROUGE-L": Rouge().compute_score(gts, res)[0],
                "CIDEr": Cider().compute_score(gts, res)[0]}

    return scores
