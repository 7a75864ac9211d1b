"""Checkpoints: ONE .safetensors file holding the tensors, with the config, vocabulary and
preprocessing as JSON in its metadata header. Loading never unpickles anything, and a checkpoint
is untrusted input: `read_checkpoint` checks the header against the config schema (types, ranges,
vocabulary, backbone), then every tensor's name, shape and dtype against what that config builds
(worked out on the `meta` device, so nothing is allocated), then the values (finite), before any
module is built. Every failure is a CheckpointError: one line naming the file and the problem.

Files are written to a temporary name and renamed, so a crash never leaves half a checkpoint.
Headers carry no local paths: `public_info` drops them at save time.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import DecodeConfig, ModelConfig, PreprocessConfig, from_dict, json_type
from .encoder import build_backbone, is_known_backbone
from .model import CaptionDecoder
from .vocab import SPECIAL_TOKENS, Vocabulary

FORMAT = "captioner/1"
MODEL_FILE = "model.safetensors"

# Sanity limits far above any real checkpoint (the shipped one: a 65 kB header, 9.4 M values).
MAX_HEADER_BYTES = 4 * 2**20          # the JSON is parsed into Python objects: keep it small
MAX_VALUES = 500_000_000              # all tensors together (2 GB as float32)
MAX_DECODERS = 16
MAX_WORD_CHARS = 100
MAX_ABS_VALUE = 1e6                   # the shipped model's largest is 566 (a BatchNorm variance)
# What a header holds; a training state (train.py's last.safetensors) adds the trainer's entries.
REQUIRED_ENTRIES = ("model", "preprocess", "vocab")
OPTIONAL_ENTRIES = ("decode", "num_decoders", "info")
TRAINING_ENTRIES = ("trainer", "optimizer", "scaler", "scheduler")
# Config fields every checkpoint has had since the format began: without them the model cannot be
# rebuilt as trained (a missing `mean` would silently normalise photos another way). Fields added
# later are optional, their defaults being the behaviour from before they existed.
REQUIRED_FIELDS = {"model": ("backbone", "feature_dim", "vocab_size", "embed_dim", "hidden_dim",
                             "num_layers", "dropout", "feature_norm"),
                   "preprocess": ("image_size", "resize", "mean", "std")}
TRAINING_TENSORS = ("optimizer.", "rng.")
# Stored dtypes accepted for a floating-point parameter (loaded as float32); integer buffers
# (BatchNorm's num_batches_tracked) must be stored as the integers they are.
FLOAT_DTYPES = ("F32", "F16", "BF16")
TORCH_DTYPES = {torch.int64: ("I64",), torch.float32: FLOAT_DTYPES}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file (line breaks
    that a hostile file smuggles into it, in a tensor name say, are shown escaped)."""

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


@dataclass
class Checkpoint:
    """A checked checkpoint: its configs, vocabulary and (unless asked not to) its tensors."""

    path: Path
    model: ModelConfig
    preprocess: PreprocessConfig
    decode: DecodeConfig
    vocab: Vocabulary
    num_decoders: int
    info: dict[str, Any]
    meta: dict[str, Any]                  # the whole parsed header (a training state's entries too)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)   # floating ones as float32


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then rename onto path (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any], half: bool = False) -> None:
    """Write tensors + JSON metadata atomically. half=True stores floating tensors as fp16."""
    def prepare(t: torch.Tensor) -> torch.Tensor:
        # A copy: safetensors refuses tensors that share memory (tied embedding and readout).
        t = t.detach().cpu().clone()
        if half and t.is_floating_point():
            t = t.half()
        return t.contiguous()

    header = {"format": FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    tensors = {k: prepare(v) for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors (as float32 where floating) and the JSON metadata, UNCHECKED: for files this
    program wrote (tests, tools). Anything from outside goes through read_checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner checkpoint (format {header.get('format')!r})")
    metadata = parse_metadata(path, header)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, metadata


def parse_metadata(path, header: Mapping[str, str]) -> dict[str, Any]:
    metadata = {}
    for key, value in header.items():
        if key == "format":
            continue
        try:
            metadata[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            detail = exc if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise CheckpointError(f"{path}: corrupt JSON in checkpoint header entry {key!r} ({detail})") from None
    return metadata


# ---------------------------------------------------------------------------------------------
# Reading an untrusted checkpoint
def read_checkpoint(path: str | os.PathLike, tensors: bool = True,
                    training_state: bool = False) -> Checkpoint:
    """Open a checkpoint file and check everything in it before anything is built from it:
    the header against the config schema, the tensors' names, shapes and dtypes against that
    config, then (tensors=True) their values. tensors=False reads the header and the tensor
    index only (cheap). training_state=True accepts train.py's last.safetensors: the trainer's
    header entries and optimizer/RNG tensors, the encoder optional. Raises CheckpointError."""
    path = Path(path)
    check_safetensors_prefix(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            layout = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            checkpoint = check_header(path, raw, layout, training_state)
            if tensors:
                checkpoint.tensors = {k: f.get_tensor(k) for k in layout}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc})") from None
    if tensors:
        check_values(checkpoint)
    return checkpoint


def check_safetensors_prefix(path: Path) -> None:
    """A safetensors file starts with the byte length of its JSON header, then '{'. Anything
    else (a pickle, a zip, a truncated file) is named as what it is not, before it is parsed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(start) < 9 or start[8:9] != b"{":
        kind = ("empty" if not start else
                "a pickle or zip file? those are never opened" if start[:2] == b"PK" or start[:1] == b"\x80"
                else "no JSON header at its start")
        raise CheckpointError(f"{path}: not a safetensors file ({kind})")
    (header_bytes,) = struct.unpack("<Q", start[:8])
    if header_bytes > size - 8:
        raise CheckpointError(f"{path}: not a safetensors file (truncated: its header claims "
                              f"{header_bytes} bytes, the file has {size})")
    if header_bytes > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header of {header_bytes} bytes is larger than a checkpoint's "
                              f"can be (limit {MAX_HEADER_BYTES})")


def check_header(path: Path, raw: Mapping[str, str], layout: Mapping[str, tuple[str, tuple[int, ...]]],
                 training_state: bool = False) -> Checkpoint:
    """A safetensors header checked: raw = its metadata (JSON strings), layout = its tensor index
    {name: (dtype such as "F16", shape)}. Nothing is read or built beyond them."""
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner checkpoint (format {json_type(raw.get('format'))})")
    checkpoint = parse_header(path, raw, training_state)
    check_layout(checkpoint, layout, training_state)
    return checkpoint


def parse_header(path: Path, raw: Mapping[str, str], training_state: bool) -> Checkpoint:
    meta = parse_metadata(path, raw)
    allowed = REQUIRED_ENTRIES + OPTIONAL_ENTRIES + (TRAINING_ENTRIES if training_state else ())
    unexpected = sorted(set(meta) - set(allowed))
    if unexpected:
        hint = (": a training state (last.safetensors)? Load its run's best/ checkpoint"
                if set(unexpected) & set(TRAINING_ENTRIES) else "")
        raise CheckpointError(f"{path}: unexpected checkpoint header entries {unexpected}{hint}")
    for key in REQUIRED_ENTRIES + (TRAINING_ENTRIES[:2] if training_state else ()):
        if key not in meta:
            raise CheckpointError(f"{path}: the checkpoint header has no '{key}' entry")
    try:
        for key, names in REQUIRED_FIELDS.items():
            missing = [name for name in names if isinstance(meta[key], dict) and name not in meta[key]]
            if missing:
                raise ValueError(f"{key} has no {', '.join(missing)}")
        model = from_dict(ModelConfig, meta["model"])
        preprocess = from_dict(PreprocessConfig, meta["preprocess"])
        decode = from_dict(DecodeConfig, meta.get("decode", {}))
        vocab = checked_vocabulary(meta["vocab"], model.vocab_size)
        num_decoders = meta.get("num_decoders", 1)
        if type(num_decoders) is not int or not 1 <= num_decoders <= MAX_DECODERS:
            raise ValueError(f"num_decoders must be an integer in [1, {MAX_DECODERS}], "
                             f"not {json_type(num_decoders)}")
        info = meta.get("info", {})
        if not isinstance(info, dict):
            raise ValueError(f"info must be a JSON object, not {json_type(info)}")
        if not is_known_backbone(model.backbone):
            raise ValueError(f"unknown backbone {model.backbone!r} (efficientnet_lite0/1/2 or a "
                             "torchvision classification model)")
        if training_state:
            check_training_entries(meta)
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid checkpoint header: {exc}") from None
    return Checkpoint(path, model, preprocess, decode, vocab, num_decoders, info, meta)


def checked_vocabulary(words: Any, vocab_size: int) -> Vocabulary:
    """A list of unique words (no spaces), the special tokens first, as many as vocab_size."""
    if not isinstance(words, list):
        raise ValueError(f"vocab must be a list of words, not {json_type(words)}")
    for i, word in enumerate(words):
        if not (isinstance(word, str) and 0 < len(word) <= MAX_WORD_CHARS and word.isprintable()
                and not any(ch.isspace() for ch in word)):
            raise ValueError(f"vocab entry {i} is not a word: {json_type(word)}")
    if len(words) != vocab_size:
        raise ValueError(f"ModelConfig.vocab_size={vocab_size} but the vocabulary has {len(words)} words")
    if tuple(words[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError(f"the vocabulary must start with {' '.join(SPECIAL_TOKENS)}")
    return Vocabulary(words)          # ValueError for duplicates


def check_training_entries(meta: dict[str, Any]) -> None:
    """The trainer's own entries: the right containers holding plain numbers."""
    trainer, optimizer = meta["trainer"], meta["optimizer"]
    if not isinstance(trainer, dict) or not all(
            isinstance(v, (int, float, bool)) for v in trainer.values()):
        raise ValueError("trainer must be a JSON object of numbers")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) for g in optimizer["param_groups"])
            and isinstance(optimizer.get("scalars"), dict)
            and all(re.fullmatch(r"\d+\.\w+", k) and isinstance(v, (int, float))
                    for k, v in optimizer["scalars"].items())):
        raise ValueError("optimizer must hold param_groups (a list of objects) and scalars "
                         "(index.name -> number)")
    for key in ("scaler", "scheduler"):
        if not isinstance(meta.get(key, {}), dict):
            raise ValueError(f"{key} must be a JSON object")


class ShapesOnly(TorchFunctionMode):
    """Modules built under it (and torch.device("meta")) get their tensors' shapes and dtypes,
    nothing else: their in-place initialisers are skipped, as a meta normal_() costs ~1.3 s the
    first time (it loads torch._dynamo). Modes are per thread, so other threads are unaffected."""

    INITIALISERS = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_",
                              "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_",
                              "zero_", "zeros_", "ones_", "fill_", "constant_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.INITIALISERS:
            return args[0] if args else kwargs["tensor"]      # the tensor, untouched
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=8)
def backbone_layout(name: str) -> tuple[int, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """(feature_dim, {tensor name: (dtype, shape)}) of a backbone, built on the meta device:
    shapes without memory."""
    try:
        with torch.device("meta"), ShapesOnly():
            backbone = build_backbone(name, pretrained=False)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        raise ValueError(f"cannot work out the tensors of backbone {name} ({exc})") from None
    return backbone.feature_dim, module_layout(backbone.module)


def module_layout(module: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (v.dtype, tuple(v.shape)) for k, v in module.state_dict().items()}


def expected_layout(checkpoint: Checkpoint) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor the header's config needs: name -> (dtype, shape). Nothing is allocated."""
    cfg = checkpoint.model
    feature_dim, encoder = backbone_layout(cfg.backbone)
    if cfg.feature_dim != feature_dim:
        raise ValueError(f"ModelConfig.feature_dim={cfg.feature_dim} but {cfg.backbone} gives "
                         f"{feature_dim} features")
    with torch.device("meta"), ShapesOnly():
        decoder = module_layout(CaptionDecoder(cfg, pad_id=checkpoint.vocab.pad_id))
    layout = {f"encoder.{k}": v for k, v in encoder.items()}
    for i in range(checkpoint.num_decoders):
        layout.update({f"decoders.{i}.{k}": v for k, v in decoder.items()})
    return layout


def check_layout(checkpoint: Checkpoint, layout: Mapping[str, tuple[str, tuple[int, ...]]],
                 training_state: bool) -> None:
    """Tensor names, dtypes and shapes (from the file's index) against the header's config."""
    path = checkpoint.path
    try:
        expected = expected_layout(checkpoint)
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid checkpoint header: {exc}") from None
    values = sum(torch.Size(shape).numel() for _, shape in layout.values())
    if values > MAX_VALUES:
        raise CheckpointError(f"{path}: {values:,} values in its tensors, more than a captioner has "
                              f"(limit {MAX_VALUES:,})")
    given = dict(layout)
    if training_state:
        # The trainer saves the encoder only when it fine-tunes it, plus its own state.
        if not any(k.startswith("encoder.") for k in given):
            expected = {k: v for k, v in expected.items() if not k.startswith("encoder.")}
        for name in [k for k in given if k.startswith(TRAINING_TENSORS)]:
            dtype, _ = given.pop(name)
            if dtype not in FLOAT_DTYPES + ("F64", "I64", "U8"):
                raise CheckpointError(f"{path}: training tensor {name!r} has dtype {dtype}")
    problems = []
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    for name, (dtype, shape) in expected.items():
        if name not in given:
            continue
        stored_dtype, stored_shape = given[name]
        if stored_shape != shape:
            problems.append(f"{name}: checkpoint {stored_shape} vs config {shape}")
        elif stored_dtype not in TORCH_DTYPES.get(dtype, ()):
            problems.append(f"{name}: dtype {stored_dtype}, expected one of {'/'.join(TORCH_DTYPES[dtype])}")
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{path}: the tensors do not match the config/vocabulary in the "
                              f"checkpoint header ({shown})")


def check_values(checkpoint: Checkpoint) -> None:
    """Finite weights of plausible size (NaN, inf, or values that overflow float32 once
    multiplied would give nonsense captions or a crash mid-decoding, not an error), BatchNorm
    variances >= 0 (a square root is taken), loaded as float32; tied embedding and readout hold
    the same values."""
    tensors = checkpoint.tensors
    for name, value in tensors.items():
        if value.is_floating_point():
            if not torch.isfinite(value).all():
                raise CheckpointError(f"{checkpoint.path}: tensor {name} holds NaN or infinite values")
            largest = value.abs().max().item() if value.numel() else 0.0
            if largest > MAX_ABS_VALUE:
                raise CheckpointError(f"{checkpoint.path}: tensor {name} holds {largest:.3g}, beyond "
                                      f"any trained weight (limit {MAX_ABS_VALUE:g})")
            if name.endswith("running_var") and value.numel() and value.min().item() < 0:
                raise CheckpointError(f"{checkpoint.path}: tensor {name} holds negative variances")
            tensors[name] = value.float()
    if checkpoint.model.tie_embeddings:
        for i in range(checkpoint.num_decoders):
            embed, readout = (tensors.get(f"decoders.{i}.{k}.weight") for k in ("embed", "readout"))
            if embed is not None and readout is not None and not torch.equal(embed, readout):
                raise CheckpointError(f"{checkpoint.path}: decoder {i} ties its readout to its "
                                      "embedding, but the two tensors differ")


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the checkpoint file: names exactly these weights, header and decoding defaults."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# Keys of config dicts that hold local paths (TrainConfig.output, DataConfig.data_root, ...).
PATH_KEYS = frozenset({"output", "cache_dir", "data_root", "karpathy_json", "init_from", "checkpoint"})


def looks_like_path(value: Any) -> bool:
    """An absolute or relative file path ('/work/runs/b0', '../data', 'runs/x', 'C:\\x', '~/a');
    sentences and URLs are not."""
    if not isinstance(value, str) or not value or any(ch.isspace() for ch in value) or "://" in value:
        return False
    return ("/" in value or "\\" in value or value.startswith("~")
            or re.match(r"[A-Za-z]:", value) is not None)


def public_info(info: Any) -> Any:
    """info without local paths (of the machine that trained it): entries named like paths and
    path-like strings are dropped, at any depth. A checkpoint is shared; its header says what the
    model is, not where its maker keeps files."""
    if isinstance(info, dict):
        return {k: public_info(v) for k, v in info.items()
                if k not in PATH_KEYS and not looks_like_path(v)}
    if isinstance(info, (list, tuple)):
        return [public_info(v) for v in info if not looks_like_path(v)]
    return info


def state_with_prefix(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in module.state_dict().items()}


def load_module_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str,
                      source: str) -> None:
    """Load tensors[prefix*] into module (read_checkpoint has checked names and shapes; this
    still explains any disagreement, e.g. a training state resumed with other options)."""
    expected = module.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = [f"{k}: checkpoint {tuple(given[k].shape)} vs config {tuple(v.shape)}"
                   for k, v in expected.items() if k in given and given[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        problems = []
        if wrong_shape:
            problems.append("shape mismatch " + "; ".join(wrong_shape[:5]))
        if missing:
            problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(
            f"{source}: the weights under '{prefix}' do not match the config/vocabulary in the "
            f"checkpoint header ({'; '.join(problems)})")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in given.items()})


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a folder holding model.safetensors or a training run's best/ one."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / MODEL_FILE, path / "best" / MODEL_FILE):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no {MODEL_FILE} in this folder or its best/ subfolder")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    return path
