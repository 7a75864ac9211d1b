"""Combine checkpoints trained on the same encoder and vocabulary into one ensemble checkpoint."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from .api import Captioner
from .checkpoint import CheckpointError
from .model import CaptionDecoder

# Training choices that leave the decoder's inference computation unchanged once the weights are
# copied out: a tied readout is an untied one holding the same matrix.
INFERENCE_NEUTRAL = {"tie_embeddings": False}


def ensemble_of(members: Sequence[Captioner], names: Sequence[str], info: dict | None = None) -> Captioner:
    """One Captioner whose decoders are all the members' (their word probabilities averaged).
    Members must share encoder weights, preprocessing, vocabulary and decoder sizes; a tied
    member's decoder is stored untied, so members trained with and without tying combine."""
    first = members[0]
    model_cfg = dataclasses.replace(first.model_cfg, **INFERENCE_NEUTRAL)
    decoders = []
    for name, member in zip(names, members):
        if member.vocab.itos != first.vocab.itos:
            raise CheckpointError(f"{name}: vocabulary differs from {names[0]}")
        if (dataclasses.replace(member.model_cfg, **INFERENCE_NEUTRAL) != model_cfg
                or member.preprocess_cfg != first.preprocess_cfg):
            raise CheckpointError(f"{name}: model or preprocessing config differs from {names[0]}")
        first_encoder = first.encoder.state_dict()
        if any(not v.equal(first_encoder[k]) for k, v in member.encoder.state_dict().items()):
            raise CheckpointError(f"{name}: encoder weights differ from {names[0]}")
        for decoder in member.decoders:
            untied = CaptionDecoder(model_cfg, pad_id=first.vocab.pad_id)
            untied.load_state_dict(decoder.state_dict())
            decoders.append(untied.eval())
    return Captioner(first.encoder, decoders, first.vocab, model_cfg, first.preprocess_cfg,
                     first.decode_cfg, {**first.info, **(info or {})})


def combine(paths: list[str], output: str, half: bool = False) -> Path:
    members = [Captioner.load(p, fast=False) for p in paths]
    ensemble = ensemble_of(members, [str(p) for p in paths],
                           {"ensemble_of": [Path(p).name for p in paths]})
    return ensemble.save(output, half=half)
