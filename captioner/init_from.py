"""Start training from a trained model (`captioner train --init-from CHECKPOINT`).

The run keeps the checkpoint's CNN weights, preprocessing, decoder sizes and decoding defaults,
and its vocabulary, extended with the new data's frequent words. Every old word keeps its id and
its rows; each new word starts as a copy of <unk>'s rows (the model already reads <unk> in place
of rare words and predicts it where one belongs), with its readout bias lowered so that the K new
words together get e^-16 of <unk>'s probability (NEW_WORD_MARGIN + log K nats each). So before
any step the model captions as the checkpoint does: decoding bans <unk> and renormalises, and an
old word's log-probability moves by at most e^-16 * p_unk / (1 - p_unk) (1e-6 where <unk> has
90 %), float32 rounding. Training lifts the new words from there.

An ensemble checkpoint (several decoders) starts from its first decoder, with a warning: its
captions before training are that decoder's, not the ensemble's.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import torch

from .checkpoint import Checkpoint, read_checkpoint, resolve_checkpoint
from .config import ModelConfig
from .vocab import Vocabulary

# ModelConfig fields that fix the shapes and the computation of the checkpoint's weights: a run
# started from it takes them from it. dropout is a training choice and may change.
ARCHITECTURE = ("backbone", "embed_dim", "hidden_dim", "num_layers", "feature_norm", "tie_embeddings")
NEW_WORD_MARGIN = 16.0


def read_initial_checkpoint(path: str | os.PathLike, tensors: bool = True) -> Checkpoint:
    """The checkpoint to start from (a file or a run folder), checked as untrusted input."""
    checkpoint = read_checkpoint(resolve_checkpoint(path), tensors=tensors)
    if tensors and checkpoint.num_decoders > 1:
        warnings.warn(f"--init-from {path}: an ensemble of {checkpoint.num_decoders} decoders; "
                      "training starts from its first decoder alone", stacklevel=2)
    return checkpoint


def option_name(field: str) -> str:
    return {"feature_norm": "--no-feature-norm"}.get(field, f"--{field.replace('_', '-')}")


def model_config_from(checkpoint: Checkpoint, requested: dict) -> ModelConfig:
    """The checkpoint's model config with the requested training options (dropout) applied.
    A requested architecture option that differs from the checkpoint is refused: ValueError
    naming each one."""
    conflicts = [f"{option_name(k)}{'' if isinstance(v, bool) else f' {v}'} (the checkpoint has "
                 f"{k}={getattr(checkpoint.model, k)})"
                 for k, v in requested.items() if k in ARCHITECTURE and v != getattr(checkpoint.model, k)]
    if conflicts:
        raise ValueError(f"--init-from {checkpoint.path}: {'; '.join(conflicts)}: these come "
                         "from the checkpoint, leave them out")
    return dataclasses.replace(checkpoint.model, **{k: v for k, v in requested.items()
                                                    if k not in ARCHITECTURE})


def check_architecture(cfg: ModelConfig, checkpoint: Checkpoint) -> None:
    """ValueError unless cfg builds the checkpoint's decoder shapes and computation."""
    model_config_from(checkpoint, {k: getattr(cfg, k) for k in ARCHITECTURE})


def extended_decoder_state(checkpoint: Checkpoint, vocab: Vocabulary) -> dict[str, torch.Tensor]:
    """The first decoder's weights for `vocab` (the checkpoint's vocabulary, extended): old rows
    copied, new rows of the embedding and readout copied from <unk>'s, new readout biases
    NEW_WORD_MARGIN + log K below <unk>'s."""
    old = checkpoint.vocab
    if vocab.itos[:len(old)] != old.itos:
        raise ValueError("the vocabulary does not extend the checkpoint's")
    prefix = "decoders.0."
    state = {k[len(prefix):]: v.clone() for k, v in checkpoint.tensors.items() if k.startswith(prefix)}
    added = len(vocab) - len(old)
    for name in ("embed.weight", "readout.weight", "readout.bias"):
        rows = state[name]                                                 # (V_old, ...)
        new = rows[old.unk_id].expand(added, *rows.shape[1:]).clone()      # (K, ...)
        if name == "readout.bias" and added:
            new -= NEW_WORD_MARGIN + math.log(added)
        state[name] = torch.cat([rows, new])                               # (V_old + K, ...)
    return state
