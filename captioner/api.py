"""The Python API every entry point calls: `Captioner.load(...).caption(images, ...)`."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from . import decoding
from .checkpoint import (MODEL_FILE, load_module_state, public_info, read_checkpoint,
                         resolve_checkpoint, save_tensors, state_with_prefix)
from .config import DecodeConfig, ModelConfig, PreprocessConfig, to_dict, with_overrides
from .encoder import build_backbone
from .engine import CaptionEngine
from .model import CaptionDecoder, DecoderStack
from .preprocess import ImageLoadError, preprocess
from .vocab import Vocabulary

# Every matrix product of decoding gets at least this many rows (zero rows added, their results
# dropped): CPU GEMM kernels sum in another order for a handful of rows (measured: 1-3 rows differ
# in the last bits from 4 and more), and then a caption could depend on how many images were
# decoded together. With the padding a row's numbers are the same in any batch.
MIN_DECODE_ROWS = 8


def default_checkpoint() -> Path:
    """The shipped model: package data when installed, the repo's checkpoints/ otherwise."""
    try:
        candidate = Path(str(resources.files("captioner.checkpoints").joinpath(MODEL_FILE)))
        if candidate.is_file():
            return candidate
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "checkpoints" / MODEL_FILE


@dataclass
class Caption:
    """A caption of one image, or (with on_error="skip") why an image has none: then .error
    holds the reason, text is "" and score/logprob are -inf."""
    text: str                       # plain English ("a man's shirt"): vocab.detokenize(words)
    score: float                    # ranking score (length-normalised log-prob for beam search)
    logprob: float                  # total log-probability of the caption (with <end>)
    words: list[str] = field(default_factory=list)          # the model's tokens ("man", "'s")
    word_probs: list[float] = field(default_factory=list)   # model probability of each token
    alternatives: list["Caption"] = field(default_factory=list)  # the n best, this one first
    image: str | None = None        # the input: its path, or a description of a PIL image
    error: str | None = None        # why the image could not be captioned (None: it was)
    failure: ImageLoadError | None = field(default=None, repr=False, compare=False)

    @classmethod
    def failed(cls, failure: ImageLoadError) -> "Caption":
        return cls(text="", score=-math.inf, logprob=-math.inf, image=failure.source,
                   error=failure.reason, failure=failure)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"caption": self.text, "score": self.score}


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (N, ...) with zero rows appended up to `rows` (x itself when it has enough)."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])


def decode_batch(step, state, cfg: DecodeConfig, bos_id: int, eos_id: int,
                 generator: torch.Generator | None = None) -> list[list[decoding.Hypothesis]]:
    """Run the decoding method named by cfg; n-best lists per batch item."""
    if cfg.method == "greedy":
        return [[h] for h in decoding.greedy(step, state, bos_id, eos_id, max_len=cfg.max_len,
                                             no_repeat_ngram_size=cfg.no_repeat_ngram_size)]
    if cfg.method == "sample":
        return decoding.sample(step, state, bos_id, eos_id, max_len=cfg.max_len,
                               temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                               generator=generator, num_samples=cfg.n_best,
                               no_repeat_ngram_size=cfg.no_repeat_ngram_size)
    if cfg.method == "beam":
        return decoding.beam_search(step, state, bos_id, eos_id, max_len=cfg.max_len,
                                    beam_size=max(cfg.beam_size, cfg.n_best),
                                    length_penalty=cfg.length_penalty, n_best=cfg.n_best,
                                    no_repeat_ngram_size=cfg.no_repeat_ngram_size)
    raise ValueError(f"unknown decoding method {cfg.method!r} (greedy | sample | beam)")


class Captioner(nn.Module):
    """CNN encoder + one or more LSTM decoders (an ensemble averages their word probabilities)."""

    def __init__(self, encoder: nn.Module, decoders: Sequence[CaptionDecoder], vocab: Vocabulary,
                 model_cfg: ModelConfig, preprocess_cfg: PreprocessConfig,
                 decode_cfg: DecodeConfig | None = None, info: dict | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoders = nn.ModuleList(decoders)
        self.vocab = vocab
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.decode_cfg = decode_cfg or DecodeConfig()
        self.info = info or {}
        # Optional faster CPU path for the CNN (ONNX Runtime); None means eager PyTorch.
        self.fast_encoder = None
        self._engine: CaptionEngine | None = None
        self._stack: tuple[tuple, DecoderStack] | None = None      # (weights' key, stack)

    @property
    def engine(self) -> CaptionEngine:
        """The inference engine every entry point runs this model with (engine.py)."""
        if self._engine is None:
            self._engine = CaptionEngine(self)
        return self._engine

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, model_cfg: ModelConfig, vocab: Vocabulary, num_decoders: int = 1,
               pretrained: bool = True, preprocess_cfg: PreprocessConfig | None = None) -> "Captioner":
        backbone = build_backbone(model_cfg.backbone, pretrained=pretrained)
        model_cfg = replace(model_cfg, feature_dim=backbone.feature_dim, vocab_size=len(vocab))
        decoders = [CaptionDecoder(model_cfg, pad_id=vocab.pad_id) for _ in range(num_decoders)]
        return cls(backbone.module, decoders, vocab, model_cfg, preprocess_cfg or backbone.preprocess)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
             fast: bool = True) -> "Captioner":
        """Load a checkpoint (file or folder); the shipped model when path is None. Everything
        in the file is checked first (see checkpoint.read_checkpoint): CheckpointError."""
        source = resolve_checkpoint(path if path is not None else default_checkpoint())
        checkpoint = read_checkpoint(source)
        model_cfg, vocab = checkpoint.model, checkpoint.vocab
        # pretrained=False: the checkpoint carries the CNN weights, so nothing is downloaded.
        encoder = build_backbone(model_cfg.backbone, pretrained=False).module
        load_module_state(encoder, checkpoint.tensors, "encoder.", str(source))
        decoders = []
        for i in range(checkpoint.num_decoders):
            decoder = CaptionDecoder(model_cfg, pad_id=vocab.pad_id)
            load_module_state(decoder, checkpoint.tensors, f"decoders.{i}.", str(source))
            decoders.append(decoder)
        captioner = cls(encoder, decoders, vocab, model_cfg, checkpoint.preprocess, checkpoint.decode,
                        checkpoint.info)
        captioner.source = str(source)
        captioner.to(device).eval()
        if fast and torch.device(device).type == "cpu":
            captioner.enable_fast_encoder()
        return captioner

    def save(self, path: str | os.PathLike, half: bool = False, info: dict | None = None) -> Path:
        """Write one self-describing checkpoint file (a folder gets model.safetensors)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / MODEL_FILE
        tensors = state_with_prefix("encoder.", self.encoder)
        for i, decoder in enumerate(self.decoders):
            tensors.update(state_with_prefix(f"decoders.{i}.", decoder))
        save_tensors(path, tensors, self.header(info), half=half)
        return path

    def header(self, info: dict | None = None) -> dict[str, Any]:
        """The checkpoint header. info is merged into self.info; local paths are dropped."""
        return {"model": to_dict(self.model_cfg), "preprocess": to_dict(self.preprocess_cfg),
                "decode": to_dict(self.decode_cfg), "vocab": self.vocab.to_list(),
                "num_decoders": len(self.decoders), "info": public_info({**self.info, **(info or {})})}

    def enable_fast_encoder(self, enabled: bool = True, threads: int | None = None) -> bool:
        """Run the CNN with ONNX Runtime on CPU (see fast_encoder.py): exported on first use,
        cached by a hash of the weights, checked against eager PyTorch. It snapshots the current
        encoder weights, so call it again after changing them. Eager PyTorch stays the reference
        and is used on CUDA or when the fast path is unavailable (one warning). threads: ONNX
        Runtime's threads per call (default: all cores). Returns whether the fast path is on."""
        from .fast_encoder import load_fast_encoder

        on_cpu = next(self.encoder.parameters()).device.type == "cpu"
        self.fast_encoder = (load_fast_encoder(self.encoder, self.preprocess_cfg, threads=threads)
                             if enabled and on_cpu else None)
        return self.fast_encoder is not None

    # -- inference ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.decoders[0].parameters()).device

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> pooled features (B, D)."""
        if self.fast_encoder is not None and images.device.type == "cpu":
            return self.fast_encoder(images)
        return self.encoder(images.to(self.device)).float()

    def decoder_stack(self) -> DecoderStack:
        """The decoders' stacked inference form (model.DecoderStack), rebuilt when their weights
        change (an optimizer step, load_state_dict or .to() moves or bumps a parameter)."""
        key = tuple((p.data_ptr(), p._version) for p in self.decoders.parameters())
        stack = self._stack
        if stack is None or stack[0] != key:
            stack = self._stack = (key, DecoderStack(list(self.decoders)))
        return stack[1]

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...]):
        """Decoding step of the (ensemble) model: the decoders' word probabilities averaged, with
        <pad>, <start> and <unk> never generated (renormalised over the remaining words).
        state: (h, c), each (N, M, L, H) for M decoders (start_state). Always the eval-mode
        computation. Fewer than MIN_DECODE_ROWS rows are padded (see there), so results never
        depend on N. To decode, take stepper() once: this looks the weights up on every call."""
        return self.stepper()(tokens, state)

    def stepper(self) -> decoding.StepFn:
        """step() bound to the current weights (decoder_stack), for one decoding run."""
        stack = self.decoder_stack()
        ensemble = len(self.decoders) > 1
        with torch.inference_mode(False):
            banned = torch.tensor([self.vocab.pad_id, self.vocab.bos_id, self.vocab.unk_id],
                                  device=stack.readout_b.device)

        def step(tokens: torch.Tensor, state: tuple[torch.Tensor, ...]):
            rows = tokens.shape[0]
            if rows < MIN_DECODE_ROWS:
                logprobs, new_state = step(pad_rows(tokens, MIN_DECODE_ROWS),
                                           tuple(pad_rows(s, MIN_DECODE_ROWS) for s in state))
                return logprobs[:rows], tuple(s[:rows] for s in new_state)
            member_logprobs, new_state = stack.step(tokens, state)                      # (M, N, V)
            logprobs = torch.logsumexp(member_logprobs, dim=0) if ensemble else member_logprobs[0]
            logprobs = logprobs.index_fill(1, banned, float("-inf"))
            return torch.log_softmax(logprobs, dim=-1), new_state                      # (N, V)

        return step

    def start_state(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pooled features (B, D) -> the decoders' initial state (h, c), each (B, M, L, H)."""
        rows = features.shape[0]
        padded = pad_rows(features, MIN_DECODE_ROWS)
        members = [decoder.start_state(padded) for decoder in self.decoders]          # (B', L, H) x 2 each
        return tuple(torch.stack([m[i] for m in members], 1)[:rows] for i in range(2))

    @torch.inference_mode()
    def caption_features(self, features: torch.Tensor, cfg: DecodeConfig | None = None
                         ) -> list[Caption]:
        """Pooled features (B, D) -> the best Caption per image (alternatives = n best)."""
        cfg = cfg or self.decode_cfg
        features = features.to(self.device)
        if cfg.method == "sample" and cfg.seed is not None and features.shape[0] > 1:
            # Seeded draws for each image alone: the same image and seed give the same caption
            # whichever images it is batched with.
            return [c for row in features.split(1) for c in self.caption_features(row, cfg)]
        generator = None
        if cfg.method == "sample" and cfg.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        state = self.start_state(features)
        nbest = decode_batch(self.stepper(), state, cfg, self.vocab.bos_id, self.vocab.eos_id, generator)
        return [self._to_caption(hyps) for hyps in nbest]

    def _to_caption(self, hyps: list[decoding.Hypothesis]) -> Caption:
        captions = []
        for h in hyps:
            words = [self.vocab.itos[t] for t in h.tokens]
            captions.append(Caption(text=self.vocab.detokenize(words), score=float(h.score),
                                    logprob=float(h.logprob), words=words,
                                    word_probs=[math.exp(lp) for lp in h.token_logprobs]))
        best = captions[0]
        best.alternatives = captions
        return best

    def preprocess(self, image) -> torch.Tensor:
        return preprocess(image, self.preprocess_cfg)

    def decode_config(self, **overrides) -> DecodeConfig:
        """The checkpoint's decoding defaults with keyword overrides (None means keep), checked
        (types and ranges, config.FIELD_RULES): ValueError naming the option."""
        return with_overrides(self.decode_cfg, **overrides)

    def caption(self, images, method: str | None = None, beam_size: int | None = None,
                batch_size: int = 32, on_error: str = "raise", **options) -> Caption | list[Caption]:
        """Caption one image (path or PIL) or a list of them. Options: max_len, length_penalty,
        temperature, top_k, top_p, seed, n_best, no_repeat_ngram_size. Returns a Caption or a
        list of Captions in input order; the same image and options give the same caption in any
        list and with any batch_size.

        An image that cannot be captioned (not an image, unreadable, over preprocess.MAX_PIXELS):
        on_error="raise" (default) raises ImageLoadError naming the file; on_error="skip" puts a
        Caption with .error (the reason) and text "" in its place and captions the others."""
        single = isinstance(images, (str, os.PathLike, Image.Image))
        items = [images] if single else list(images)
        results = list(self.caption_stream(items, method=method, beam_size=beam_size,
                                           batch_size=batch_size, on_error=on_error, **options))
        return results[0] if single else results

    def caption_stream(self, images, method: str | None = None, beam_size: int | None = None,
                       batch_size: int = 32, on_error: str = "raise", **options):
        """As caption() on a list, but yields each Caption (input order) as its batch finishes."""
        cfg = self.decode_config(method=method, beam_size=beam_size, **options)
        return self.engine.caption(images, cfg, batch_size=batch_size, on_error=on_error)
