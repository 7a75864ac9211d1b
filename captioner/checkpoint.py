"""Checkpoints: ONE .safetensors file holding the tensors, with the config, vocabulary and
preprocessing as JSON in its metadata header. Loading never unpickles anything, so a checkpoint
from a stranger is safe to open; a header that disagrees with the tensors fails with a clear error.

Files are written to a temporary name and renamed, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "captioner/1"
MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    pass


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
    """Read tensors (as float32 where floating) and the JSON metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner checkpoint (format {header.get('format')!r})")
    try:
        metadata = {k: json.loads(v) for k, v in header.items() if k != "format"}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt JSON in checkpoint header ({exc})") from None
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, metadata


def state_with_prefix(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in module.state_dict().items()}


def load_module_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str,
                      source: str) -> None:
    """Load tensors[prefix*] into module, explaining any disagreement with the config."""
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
