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


def same_encoder(a: dict, b: dict) -> bool:
    """Equal encoder weights, compared at fp16 precision: shipped checkpoints store fp16, so a member
    read from one (e.g. an earlier release) holds the fp16 rounding of the same pretrained CNN that
    a freshly trained member holds in fp32. The ensemble keeps the first member's copy."""
    return a.keys() == b.keys() and all(
        a[k].half().equal(b[k].half()) if a[k].is_floating_point() else a[k].equal(b[k]) for k in a)


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
        if not same_encoder(first.encoder.state_dict(), member.encoder.state_dict()):
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
