"""Combine checkpoints trained on the same encoder and vocabulary into one ensemble checkpoint."""
from __future__ import annotations

from pathlib import Path

from .api import Captioner
from .checkpoint import CheckpointError


def combine(paths: list[str], output: str, half: bool = False) -> Path:
    members = [Captioner.load(p, fast=False) for p in paths]
    first = members[0]
    for path, other in zip(paths[1:], members[1:]):
        if other.vocab.itos != first.vocab.itos:
            raise CheckpointError(f"{path}: vocabulary differs from {paths[0]}")
        if other.model_cfg != first.model_cfg or other.preprocess_cfg != first.preprocess_cfg:
            raise CheckpointError(f"{path}: model or preprocessing config differs from {paths[0]}")
    decoders = [d for m in members for d in m.decoders]
    ensemble = Captioner(first.encoder, decoders, first.vocab, first.model_cfg, first.preprocess_cfg,
                         first.decode_cfg, {**first.info, "ensemble_of": [str(p) for p in paths]})
    return ensemble.save(output, half=half)
