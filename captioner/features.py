"""The feature cache: a frozen CNN's pooled features of a list of images, computed once and stored
as a memory-mapped fp16 array (N, D) with a mask of the images that could be read.

`cached_features` builds or reads one cache entry (a shard of it under torchrun);
`feature_cache` is what training and `captioner prepare` call: the CNN on ONNX Runtime (CPU) or
eager PyTorch (CUDA), the images split over the ranks, rank 0 merging the shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import atomic_write
from .config import PreprocessConfig, cache_folder, to_dict
from .datasets import ImageCaptions
from .distributed import World
from .encoder import encoder_digest
from .fast_encoder import make_encode_fn
from .preprocess import ImageInputs, collate_images, open_image


def default_cache_dir() -> Path:
    return cache_folder("features")


def image_loader(paths: list[str], cfg: PreprocessConfig, batch_size: int, num_workers: int,
                 transform=None) -> DataLoader:
    return DataLoader(ImageInputs(paths, cfg, transform), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_images,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def cache_key(backbone: str, cfg: PreprocessConfig, paths: list[str], variant: str = "", *,
              weights: str) -> str:
    """The name of a cache entry: everything that changes its features. weights is the CNN's
    encoder_digest (a fine-tuned or fp16-rounded CNN gives other features than ImageNet's)."""
    payload = json.dumps({"backbone": backbone, "weights": weights, "preprocess": to_dict(cfg),
                          "variant": variant, "paths": [os.path.abspath(p) for p in paths]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_files(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """One cache entry: the fp16 array and its completion marker (written last, with the mask)."""
    return Path(cache_dir) / f"features-{key}.npy", Path(cache_dir) / f"features-{key}.json"


def read_cache(cache_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A complete cache entry (its marker is written last), or None."""
    array_path, done_path = cache_files(cache_dir, key)
    if not done_path.is_file():
        return None
    ok = np.array(json.loads(done_path.read_text())["ok"], dtype=bool)
    return np.load(array_path, mmap_mode="r"), ok


def cache_lock(cache_dir: Path, key: str, part: str = "") -> FileLock:
    """Held while an entry (or one rank's part of it) is built, so that two runs on the same
    images at once build it once: the second waits, then reads it."""
    return FileLock(cache_dir / f".features-{key}{part}.lock")


def part_file(cache_dir: Path, key: str, rank: int, world: int) -> Path:
    return cache_dir / f"features-{key}.rank{rank}of{world}.npz"


def cached_features(encode, backbone: str, cfg: PreprocessConfig, paths: list[str],
                    cache_dir: str | os.PathLike, batch_size: int = 64, num_workers: int = 2,
                    variant: str = "", transform=None, shard: tuple[int, int] = (0, 1),
                    progress: bool = True, *, weights: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) fp16 memory-mapped, and a bool mask of images that could be read.

    The key (cache_key) covers backbone, CNN weights, preprocessing and the image list, so a
    change to any of them computes a new cache. shard=(rank, world) computes only this rank's
    rows and returns (None, None): the caller merges (merge_feature_shards) once all are done.
    Every file is written under a temporary name and renamed.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(backbone, cfg, paths, variant, weights=weights)
    rank, world = shard
    # This rank's lock (merging takes the entry's): a second run waits here, then finds it built.
    with cache_lock(cache_dir, key, f".rank{rank}of{world}"):
        built = read_cache(cache_dir, key)
        if built is None and not part_file(cache_dir, key, rank, world).is_file():
            encode_part(encode, backbone, cfg, paths, part_file(cache_dir, key, rank, world), batch_size,
                        num_workers, transform, shard, progress)
        if built is None and world == 1:
            merge_feature_shards(cache_dir, key, len(paths), world)
            built = read_cache(cache_dir, key)
    return built if world == 1 else (None, None)


def encode_part(encode, backbone: str, cfg: PreprocessConfig, paths: list[str], part_path: Path,
                batch_size: int, num_workers: int, transform, shard: tuple[int, int], progress: bool) -> None:
    """Encode this rank's images (every world-th from rank) into part_path: their indices and
    fp16 features; unreadable images are left out, counted in one warning."""
    from tqdm import tqdm

    rank, world = shard
    mine = list(range(rank, len(paths), world))
    rows, indices = [], []
    loader = image_loader([paths[i] for i in mine], cfg, batch_size, num_workers, transform)
    bar = tqdm(total=len(mine), desc=f"features {backbone}", unit="img", disable=not progress)
    failed = []
    for local_idx, images, errors in loader:
        if images is not None:
            rows.append(encode(images).cpu().numpy().astype(np.float16))
            indices += [mine[i] for i in local_idx]
        failed += [(paths[mine[i]], e) for i, e in errors]
        bar.update(len(local_idx) + len(errors))
    bar.close()
    if failed:
        warnings.warn(f"feature cache: skipped {len(failed)} unreadable images "
                      f"(first: {failed[0][0]}: {failed[0][1]})", stacklevel=3)
    features = np.concatenate(rows) if rows else np.zeros((0, 0), np.float16)

    def write_part(tmp: str) -> None:
        with open(tmp, "wb") as f:       # a file object: np.savez would add .npz to the name
            np.savez(f, indices=np.array(indices, dtype=np.int64), features=features)

    atomic_write(part_path, write_part)


def merge_feature_shards(cache_dir: Path, key: str, total: int, world: int) -> None:
    """Combine the per-rank parts into the memory-mapped array and mark the cache complete
    (once: a run that finds it complete, built meanwhile by another, leaves it)."""
    cache_dir = Path(cache_dir)
    with cache_lock(cache_dir, key):
        if read_cache(cache_dir, key) is not None:
            return
        part_paths = [part_file(cache_dir, key, r, world) for r in range(world)]
        missing = [p.name for p in part_paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"feature cache {cache_dir}: parts {missing} were not written here. On several machines "
                "--cache-dir must be a shared folder, or run `captioner prepare` on each machine first")
        parts = [np.load(p) for p in part_paths]
        dim = max((p["features"].shape[1] for p in parts if p["features"].size), default=0)
        array_path, done_path = cache_files(cache_dir, key)
        ok = np.zeros(total, dtype=bool)

        def write_array(tmp: str) -> None:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, dim))
            for p in parts:
                if p["features"].size:
                    array[p["indices"]] = p["features"]
                    ok[p["indices"]] = True
            array.flush()

        atomic_write(array_path, write_array)
        atomic_write(done_path, lambda tmp: Path(tmp).write_text(json.dumps({"ok": ok.tolist()})))
        for p in part_paths:
            p.unlink(missing_ok=True)


def hflip(path: str) -> Image.Image:
    """The photo mirrored left to right: the second view of the flip-augmented feature cache."""
    return open_image(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def feature_cache(encoder: nn.Module, backbone: str, preprocess_cfg: PreprocessConfig,
                  records: list[ImageCaptions], cache_dir: Path, world: World,
                  device: torch.device, num_workers: int, flipped: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped fp16 features (N, D) of the records' images (mirrored when `flipped`) and a
    mask of the readable ones, computed once: under torchrun each rank encodes 1/world of the
    images and rank 0 merges."""
    encoder.eval()
    fast_encode = None
    weights = encoder_digest(encoder)

    @torch.inference_mode()
    def encode(images: torch.Tensor) -> torch.Tensor:
        # Built on first use only (an ONNX export takes seconds and a built cache needs none):
        # ONNX Runtime on CPU, as `captioner caption` uses, eager PyTorch on CUDA.
        nonlocal fast_encode
        if fast_encode is None:
            fast_encode = make_encode_fn(encoder, preprocess_cfg, device)
        return fast_encode(images).float()                          # (B, D)

    paths = [r.path for r in records]
    args = dict(cache_dir=cache_dir, batch_size=64, num_workers=num_workers, weights=weights,
                variant="hflip" if flipped else "", transform=hflip if flipped else None)
    if world.size > 1:
        key = cache_key(backbone, preprocess_cfg, paths, args["variant"], weights=weights)
        # Decided together: a rank that skipped the shards would leave the others at the barrier.
        if not world.all_true(cache_files(cache_dir, key)[1].is_file()):
            cached_features(encode, backbone, preprocess_cfg, paths, shard=(world.rank, world.size),
                            progress=world.is_main, **args)
            world.barrier()
            if world.is_main:
                merge_feature_shards(Path(cache_dir), key, len(paths), world.size)
            world.barrier()
    return cached_features(encode, backbone, preprocess_cfg, paths, progress=world.is_main, **args)
