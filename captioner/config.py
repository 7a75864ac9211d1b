"""Typed configuration: one dataclass per concern, each to and from a plain dict.

Dicts (not pickles) are what checkpoints store, so every field must be JSON-serialisable.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def cache_folder(kind: str) -> Path:
    """Where captioner keeps a kind of cache on this machine ("features", "onnx"): the user's
    cache folder as platformdirs finds it (~/.cache/captioner/<kind> on Linux, XDG_CACHE_HOME
    respected)."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("captioner")) / kind


def from_dict(cls: type[T], data: Any) -> T:
    """Build a dataclass from a plain dict (a checkpoint header's, say), checked field by field:
    unknown keys are refused (a typo must not pass silently), every value must have exactly its
    annotated type (512, not "512", 512.0 or True) and lie in its range (FIELD_RULES). Raises
    ValueError naming the field. Missing fields take their defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object, not {json_type(data)}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(map(str, unknown))}")
    return check_config(cls(**{name: data[name] for name in names if name in data}))


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def with_overrides(cfg: T, **overrides) -> T:
    """cfg with the given fields replaced (None means keep), checked: ValueError naming the field."""
    return check_config(dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None}))


# ---------------------------------------------------------------------------------------------
# The schema: every field's type comes from its annotation; its range from FIELD_RULES below.
@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    need: str                               # what a valid value is, for the message


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    def ok(value) -> bool:
        return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    return Rule(ok, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda value: value in choices, f"one of {' | '.join(choices)}")


def each(count: int, rule: Rule) -> Rule:
    return Rule(lambda values: len(values) == count and all(rule.ok(v) for v in values),
                f"{count} values, each {rule.need}")


LR_SCHEDULES = ("cosine", "step", "constant")

# Ranges of the fields a checkpoint carries (its header is untrusted input) and that decoding
# options set. Upper bounds are sanity limits far above any real model, so a hostile header can
# never make us allocate gigabytes or decode forever. A field missing here gets its type checked
# (and finite numbers), nothing more: tests/test_checkpoint.py insists that every numeric field
# of these three configs has a rule, so a new field gets one when it is added.
FIELD_RULES: dict[str, Rule] = {
    "PreprocessConfig.image_size": between(16, 1024),
    "PreprocessConfig.resize": one_of("squash", "center_crop", "pad"),
    "PreprocessConfig.mean": each(3, between(-10, 10)),
    "PreprocessConfig.std": each(3, between(0.001, 10)),      # divided by: > 0
    "ModelConfig.backbone": Rule(lambda v: 0 < len(v) <= 64 and v.isidentifier(), "a backbone name"),
    "ModelConfig.feature_dim": between(1, 8192),
    "ModelConfig.vocab_size": between(4, 100_000),            # at least the four special tokens
    "ModelConfig.embed_dim": between(1, 8192),
    "ModelConfig.hidden_dim": between(1, 8192),
    "ModelConfig.num_layers": between(1, 8),
    "ModelConfig.dropout": between(0, 1, high_open=True),
    "DecodeConfig.method": one_of("greedy", "sample", "beam"),
    "DecodeConfig.beam_size": between(1, 64),
    "DecodeConfig.max_len": between(1, 200),
    "DecodeConfig.length_penalty": between(0, 10),
    "DecodeConfig.temperature": between(0, 100, low_open=True),
    "DecodeConfig.top_k": between(0, 100_000),
    "DecodeConfig.top_p": between(0, 1, low_open=True),
    "DecodeConfig.seed": between(0, 2**32 - 1),
    "DecodeConfig.n_best": between(1, 64),
    "DecodeConfig.no_repeat_ngram_size": between(0, 200),
    "TrainConfig.lr_schedule": one_of(*LR_SCHEDULES),
    "TrainConfig.patience": between(0, 10**6),
    "TrainConfig.fine_tune_top": between(0, 1000),
}


# Python types as a JSON header spells them, for messages.
TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
              list: "a list", tuple: "a list", dict: "an object", type(None): "null"}


def json_type(value: Any) -> str:
    """A value and its JSON type, for messages: '\'512\' (a string)', '1.0 (a number)'."""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{shown} ({TYPE_NAMES.get(type(value), type(value).__name__)})"


def check_value(value: Any, annotation: Any) -> Any:
    """value converted to the annotation's Python type (a JSON list -> tuple, an integer -> float
    for a float field), or ValueError saying what was expected. bool is never an int here."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return check_value(value, inner)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list of numbers, not {json_type(value)}")
        return tuple(check_value(v, args[0]) for v in value)
    if annotation is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"must be a finite number, not {json_type(value)}")
        return float(value)
    expected = origin or annotation                  # list[str] -> list
    if type(value) is not expected:
        raise ValueError(f"must be {TYPE_NAMES.get(expected, expected.__name__)}, not {json_type(value)}")
    return value


def check_config(obj: T) -> T:
    """The dataclass with every field checked against its annotation and FIELD_RULES (a new
    object: JSON lists become tuples, integers in float fields floats). Raises ValueError."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        name, value = f"{cls.__name__}.{f.name}", getattr(obj, f.name)
        try:
            value = check_value(value, hints[f.name])
        except ValueError as exc:
            raise ValueError(f"{name} {exc}") from None
        rule = FIELD_RULES.get(name)
        if rule is not None and value is not None and not rule.ok(value):
            raise ValueError(f"{name} must be {rule.need}, not {json_type(getattr(obj, f.name))}")
        values[f.name] = value
    return dataclasses.replace(obj, **values)


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


DATASETS = ("flickr8k", "coco", "karpathy", "imagefolder")   # the layouts are in data/README.md


@dataclass
class DataConfig:
    dataset: str = "flickr8k"        # one of DATASETS
    data_root: str = ""
    train_split: str = "train"       # the dataset's own split names (COCO without Karpathy: train2017)
    # None: the dataset's validation split (Flickr8k dev; val of a Karpathy file or an image folder
    # that has one), else holdout_fraction of train
    val_split: str | None = None
    karpathy_json: str | None = None
    min_word_count: int = 5
    max_caption_len: int = 30        # tokens kept per caption (without <start>/<end>)
    holdout_fraction: float = 0.05   # without a validation split: this part of train validates


@dataclass
class TrainConfig:
    output: str = "runs/flickr8k"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    lr_schedule: str = "cosine"      # cosine | step | constant (after warmup_steps of linear warm-up)
    lr_step_epochs: int = 3
    lr_step_gamma: float = 0.8
    warmup_steps: int = 200
    patience: int = 4                # stop after this many epochs without a better dev CIDEr; 0: never
    seed: int = 0
    device: str = "cpu"
    amp: bool = True                 # mixed precision (CUDA only)
    fine_tune_cnn: bool = False
    cnn_lr: float = 1e-5
    fine_tune_after_epochs: int = 0  # start CNN fine-tuning once the decoder has settled
    # Fine-tune only the top of an EfficientNet-Lite CNN: its last `fine_tune_top` blocks and head
    # convolution train (at cnn_lr) on cached activations of the frozen blocks below, so an epoch
    # costs minutes on a CPU where --fine-tune-cnn costs hours. Usually with --init-from a trained
    # model, once its decoder has settled. 0: off.
    fine_tune_top: int = 0
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
    # A checkpoint to start from (file or run folder): its weights, config, preprocessing and
    # vocabulary, extended with the new data's words (see init_from.py).
    init_from: str | None = None
