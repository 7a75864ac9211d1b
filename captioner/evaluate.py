"""coco-caption metrics with pycocoevalcap's own scorers, and captions for a dataset split.

`COCOEvalCap.evaluate()` also runs SPICE, which downloads Stanford CoreNLP at first use and fails
offline, so the scorers are called directly: PTBTokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr.
METEOR and the PTB tokenizer run Java (`java` must be on PATH).
"""
from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import warnings
from collections.abc import Mapping, Sequence

from .config import DecodeConfig
from .datasets import ImageCaptions

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


JAVA_HELP = "install a JRE (Debian: apt-get install default-jre-headless)"


@functools.lru_cache(maxsize=1)
def java_problem() -> str | None:
    """Why `java` cannot run (None: it can). Asked once per process: ~0.1-1 s."""
    if shutil.which("java") is None:
        return "no java on PATH"
    try:
        result = subprocess.run(["java", "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"java -version failed ({exc})"
    return None if result.returncode == 0 else f"java -version exited with status {result.returncode}"


def require_java() -> None:
    """Entry points that will score (evaluate, training's validation) call it first."""
    problem = java_problem()
    if problem:
        # FileNotFoundError, as subprocess would raise: entry points report it in one line.
        raise FileNotFoundError(f"METEOR and the PTB tokenizer need Java ({problem}): {JAVA_HELP}")


def score_captions(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str],
                   metrics: Sequence[str] = METRIC_NAMES) -> dict[str, float]:
    """Corpus scores of candidate captions against their references (ids must match)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(references) != set(candidates):
        raise ValueError("references and candidates must cover the same image ids")
    if not candidates:  # METEOR would wait forever for an answer, CIDEr would crash
        raise ValueError("no captions to score")
    require_java()
    ids = sorted(candidates)
    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    cands = tokenizer.tokenize({i: [{"caption": candidates[i]}] for i in ids})
    scores: dict[str, float] = {}
    wanted = set(metrics)
    if wanted & {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}:
        bleu, _ = Bleu(4).compute_score(refs, cands, verbose=0)
        scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "METEOR" in wanted:
        scores["METEOR"] = float(meteor_scorer().compute_score(refs, cands)[0])
    if "ROUGE-L" in wanted:
        scores["ROUGE-L"] = float(Rouge().compute_score(refs, cands)[0])
    if "CIDEr" in wanted:
        scores["CIDEr"] = float(Cider().compute_score(refs, cands)[0])
    return {k: scores[k] for k in METRIC_NAMES if k in scores}


_meteor = None


def meteor_scorer():
    """One METEOR process per Python process: its Java start (paraphrase tables, ~1 GB) takes
    seconds, a scoring call milliseconds, so repeated evaluations share it until exit."""
    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor = Meteor()
        atexit.register(close_meteor, _meteor)
    return _meteor


def close_meteor(meteor) -> None:
    """Stop METEOR's Java subprocess (at exit, before the interpreter tears its pipes down)."""
    proc = getattr(meteor, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with meteor.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()


def caption_records(captioner, records: Sequence[ImageCaptions], cfg: DecodeConfig,
                    batch_size: int = 64, num_workers: int | None = None, progress: bool = True
                    ) -> dict[str, str]:
    """Generated caption per image id, by the engine every entry point uses (images that cannot
    be read are left out, with one warning). num_workers: image-reading processes (None: the
    engine's default)."""
    from tqdm import tqdm

    from .engine import CaptionEngine

    engine = captioner.engine if num_workers is None else CaptionEngine(captioner, workers=num_workers)
    out: dict[str, str] = {}
    failed: list[tuple[int, str]] = []
    results = engine.caption([r.path for r in records], cfg, batch_size=batch_size, on_error="skip")
    with tqdm(total=len(records), desc="captioning", unit="img", disable=not progress) as bar:
        for i, caption in enumerate(results):
            if caption.error is None:
                out[records[i].image_id] = caption.text
            else:
                failed.append((i, caption.error))
            bar.update(1)
    if failed:
        i, reason = failed[0]
        warnings.warn(f"captioning: skipped {len(failed)} unreadable images "
                      f"(first: {records[i].path}: {reason})", stacklevel=2)
    return out


def evaluate_records(captioner, records: Sequence[ImageCaptions], cfg: DecodeConfig,
                     **kwargs) -> tuple[dict[str, float], dict[str, str]]:
    candidates = caption_records(captioner, records, cfg, **kwargs)
    if not candidates:
        raise ValueError(f"none of the {len(records)} images could be read, nothing to score")
    references = {r.image_id: r.captions for r in records if r.image_id in candidates}
    return score_captions(references, candidates), candidates


def format_scores(scores: Mapping[str, float]) -> str:
    return "\n".join(f"{name:8s} {value:.4f}" for name, value in scores.items())
