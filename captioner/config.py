"""Typed configuration: one dataclass per concern, each to and from a plain dict.

Dicts (not pickles) are what checkpoints store, so every field must be JSON-serialisable.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, rejecting unknown keys (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


@dataclass
class PreprocessConfig:
    """The ONE image pipeline, stored in every checkpoint (see preprocess.py)."""

    image_size: int = 224
    # "squash": resize to image_size x image_size ignoring aspect ratio (what the Flickr8k
    # copies are); "center_crop": shorter side to image_size then crop; "pad": letterbox.
    resize: str = "squash"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    feature_dim: int = 1280          # pooled CNN feature size (set from the backbone)
    vocab_size: int = 0              # set from the vocabulary
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5             # on features, embeddings and LSTM outputs
    feature_norm: bool = True        # LayerNorm on pooled features before the init layers
    # The readout shares the word embedding's weights (Press & Wolf 2017; needs embed_dim == hidden_dim).
    tie_embeddings: bool = False


@dataclass
class DecodeConfig:
    method: str = "beam"             # greedy | sample | beam
    beam_size: int = 3
    max_len: int = 20
    length_penalty: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    n_best: int = 1
    no_repeat_ngram_size: int = 0    # > 0: never repeat an n-gram of this size ("a horse on a horse")


@dataclass
class DataConfig:
    dataset: str = "flickr8k"        # flickr8k | coco
    data_root: str = ""
    train_split: str = "train"
    val_split: str = "dev"
    karpathy_json: str | None = None
    min_word_count: int = 5
    max_caption_len: int = 30        # tokens kept per caption (without <start>/<end>)
    holdout_fraction: float = 0.05   # COCO without a val split: this part of train validates


@dataclass
class TrainConfig:
    output: str = "runs/flickr8k"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    lr_schedule: str = "cosine"      # cosine | step | constant
    lr_step_epochs: int = 3
    lr_step_gamma: float = 0.8
    warmup_steps: int = 200
    patience: int = 4                # epochs without dev CIDEr improvement before stopping
    seed: int = 0
    device: str = "cpu"
    amp: bool = True                 # mixed precision (CUDA only)
    fine_tune_cnn: bool = False
    cnn_lr: float = 1e-5
    fine_tune_after_epochs: int = 0  # start CNN fine-tuning once the decoder has settled
    num_workers: int = 2
    cache_dir: str | None = None     # feature cache (default: ~/.cache/captioner/features)
    checkpoint_every: int = 500      # steps between resumable checkpoints (and at every epoch end)
    val_images: int = 0              # 0 = all of the validation split
    label_smoothing: float = 0.0
    # Scheduled sampling (Bengio et al. 2015): each input word after <start> is replaced, with this
    # probability, by a word sampled from the model's own prediction; ramped up linearly from 0 over
    # the first `scheduled_sampling_ramp` epochs ("always sample" from the start collapses). Targets
    # stay the one-hot next words.
    scheduled_sampling: float = 0.0
    scheduled_sampling_ramp: int = 5
    # Train on the features of horizontally flipped photos half of the time (a second feature cache).
    flip_augment: bool = False
    resume: bool = False
