"""The training checkpoint (last.safetensors): everything a killed run needs to continue exactly
(weights, optimiser and schedule, position, every rank's RNG), and the check that a resumed run
is the same run (options, data, starting checkpoint), naming each difference when it is not."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import fingerprint, read_checkpoint, save_tensors
from .config import DataConfig, ModelConfig, TrainConfig, to_dict
from .datasets import ImageCaptions, validation_split
from .distributed import World
from .init_from import ARCHITECTURE, option_name

LAST_FILE = "last.safetensors"


def records_digest(train: list[ImageCaptions], val: list[ImageCaptions]) -> str:
    """sha256 of the image ids and captions a run trains and validates on (paths left out)."""
    payload = json.dumps([[[r.image_id, r.captions] for r in records] for records in (train, val)])
    return hashlib.sha256(payload.encode()).hexdigest()


# What a resumed run may change: where and how fast it runs, and when it gives up; not what it computes.
RESUME_MAY_CHANGE = frozenset({"output", "resume", "device", "amp", "num_workers", "cache_dir",
                               "checkpoint_every", "patience"})


def resume_differences(meta: dict, cfg: TrainConfig, data_cfg: DataConfig, model_cfg: ModelConfig,
                       start, data_sha256: str) -> list[str]:
    """What differs between a saved training state (its header `meta`) and this run's options
    and data, one entry per difference naming the option. Path options (--data-root ...) are not
    saved: the data's digest and the starting checkpoint's sha256 stand for them."""
    info = meta.get("info", {})
    saved_data, now_data = dict(info.get("data", {})), to_dict(data_cfg)
    if "val_split" in saved_data:
        # Compared as the split each names: "dev" then, None (the dataset's own: dev) now.
        saved_data["val_split"] = validation_split(replace(data_cfg, val_split=saved_data["val_split"]))
        now_data["val_split"] = validation_split(data_cfg)
    changes = []
    for saved, now in ((info.get("train", {}), to_dict(cfg)), (saved_data, now_data),
                       (meta["model"], {k: getattr(model_cfg, k) for k in ARCHITECTURE + ("dropout",)})):
        for name, value in now.items():
            if name in saved and name not in RESUME_MAY_CHANGE and saved[name] != value:
                changes.append(f"{option_name(name)} was {saved[name]}, now {value}")
    if info.get("data_sha256", data_sha256) != data_sha256:
        changes.append("the images or captions differ")
    started = info.get("started_from", {}).get("sha256")
    if started != (fingerprint(start.path) if start else None):
        changes.append("--init-from names another checkpoint" if started and start else
                       f"--init-from was {'given' if started else 'not given'}, now {'given' if start else 'not'}")
    return changes


def read_training_state(out: Path, world: World) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The tensors and header of OUTPUT/last.safetensors (checked as untrusted), None if absent."""
    path = out / LAST_FILE
    if not path.is_file():
        if world.is_main:
            warnings.warn(f"--resume: no {path} yet, starting fresh", stacklevel=3)
        return None
    checkpoint = read_checkpoint(path, training_state=True)
    return checkpoint.tensors, checkpoint.meta


def rng_states(world: World, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's torch RNG state (CPU, and the GPU's on CUDA), gathered on all ranks."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world.size == 1:
        return [mine]
    states = [None] * world.size
    dist.all_gather_object(states, mine)
    return states


def save_training_state(out: Path, world: World, device: torch.device, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
    """Write last.safetensors: the given tensors and header, and every rank's RNG state. All ranks
    call it (the RNG states are gathered); rank 0 writes."""
    rng = rng_states(world, device)
    if world.is_main:
        for rank, states in enumerate(rng):
            tensors.update({f"rng.{kind}.{rank}": state for kind, state in states.items()})
        save_tensors(out / LAST_FILE, tensors, {**meta, "trainer": {**meta["trainer"], "world_size": world.size}})


def restore_rng(tensors: dict[str, torch.Tensor], trainer: dict, world: World, device: torch.device,
                seed: int, global_step: int) -> None:
    """This rank's saved RNG state; with another number of processes than the saved run, new
    (still seeded) dropout streams."""
    rank = world.rank
    if trainer.get("world_size") == world.size and f"rng.cpu.{rank}" in tensors:
        torch.set_rng_state(tensors[f"rng.cpu.{rank}"])
        if device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], device)
    else:
        torch.manual_seed(seed + rank + 1_000_003 * global_step)
