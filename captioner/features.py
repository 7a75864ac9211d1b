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
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from .config import PreprocessConfig, to_dict
from .datasets import ImageCaptions
from .distributed import World
from .fast_encoder import make_encode_fn
from .preprocess import ImageInputs, collate_images, open_image


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "captioner" / "features"


def image_loader(paths: list[str], cfg: PreprocessConfig, batch_size: int, num_workers: int,
                 transform=None) -> DataLoader:
    return DataLoader(ImageInputs(paths, cfg, transform), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_images,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def cache_key(backbone: str, cfg: PreprocessConfig, paths: list[str], variant: str = "") -> str:
    payload = json.dumps({"backbone": backbone, "preprocess": to_dict(cfg), "variant": variant,
                          "paths": [os.path.abspath(p) for p in paths]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_files(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """One cache entry: the fp16 array and its completion marker (written last, with the mask)."""
    return Path(cache_dir) / f"features-{key}.npy", Path(cache_dir) / f"features-{key}.json"


def cached_features(encode, backbone: str, cfg: PreprocessConfig, paths: list[str],
                    cache_dir: str | os.PathLike, batch_size: int = 64, num_workers: int = 2,
                    variant: str = "", transform=None, shard: tuple[int, int] = (0, 1),
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) fp16 memory-mapped, and a bool mask of images that could be read.

    The key covers backbone, preprocessing and the image list, so a change to any of them
    computes a new cache. shard=(rank, world) computes only this rank's rows (rank 0 creates
    the file; the caller synchronises ranks before reading).
    """
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(backbone, cfg, paths, variant)
    array_path, done_path = cache_files(cache_dir, key)
    if done_path.is_file():
        ok = np.array(json.loads(done_path.read_text())["ok"], dtype=bool)
        return np.load(array_path, mmap_mode="r"), ok
    rank, world = shard
    mine = list(range(rank, len(paths), world))
    part_path = cache_dir / f"features-{key}.rank{rank}.npz"
    ok = np.zeros(len(paths), dtype=bool)
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
                      f"(first: {failed[0][0]}: {failed[0][1]})", stacklevel=2)
    features = np.concatenate(rows) if rows else np.zeros((0, 0), np.float16)
    np.savez(part_path, indices=np.array(indices, dtype=np.int64), features=features)
    if world == 1:
        merge_feature_shards(cache_dir, key, len(paths), world)
        return cached_features(encode, backbone, cfg, paths, cache_dir, progress=False,
                               variant=variant)
    return None, None


def merge_feature_shards(cache_dir: Path, key: str, total: int, world: int) -> None:
    """Combine the per-rank parts into the memory-mapped array and mark the cache complete."""
    part_paths = [cache_dir / f"features-{key}.rank{r}.npz" for r in range(world)]
    missing = [p.name for p in part_paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"feature cache {cache_dir}: parts {missing} were not written here. On several machines "
            "--cache-dir must be a shared folder, or run `captioner prepare` on each machine first")
    parts = [np.load(p) for p in part_paths]
    dim = max((p["features"].shape[1] for p in parts if p["features"].size), default=0)
    array = np.lib.format.open_memmap(cache_dir / f"features-{key}.npy.tmp.npy", mode="w+",
                                      dtype=np.float16, shape=(total, dim))
    ok = np.zeros(total, dtype=bool)
    for p in parts:
        if p["features"].size:
            array[p["indices"]] = p["features"]
            ok[p["indices"]] = True
    array.flush()
    del array
    os.replace(cache_dir / f"features-{key}.npy.tmp.npy", cache_dir / f"features-{key}.npy")
    (cache_dir / f"features-{key}.json").write_text(json.dumps({"ok": ok.tolist()}))
    for r in range(world):
        (cache_dir / f"features-{key}.rank{r}.npz").unlink(missing_ok=True)


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

    @torch.inference_mode()
    def encode(images: torch.Tensor) -> torch.Tensor:
        # Built on first use only (an ONNX export takes seconds and a built cache needs none):
        # ONNX Runtime on CPU, as `captioner caption` uses, eager PyTorch on CUDA.
        nonlocal fast_encode
        if fast_encode is None:
            fast_encode = make_encode_fn(encoder, preprocess_cfg, device)
        return fast_encode(images).float()                          # (B, D)

    paths = [r.path for r in records]
    args = dict(cache_dir=cache_dir, batch_size=64, num_workers=num_workers,
                variant="hflip" if flipped else "", transform=hflip if flipped else None)
    if world.size > 1:
        key = cache_key(backbone, preprocess_cfg, paths, args["variant"])
        # Decided together: a rank that skipped the shards would leave the others at the barrier.
        if not world.all_true(cache_files(cache_dir, key)[1].is_file()):
            cached_features(encode, backbone, preprocess_cfg, paths, shard=(world.rank, world.size),
                            progress=world.is_main, **args)
            world.barrier()
            if world.is_main:
                merge_feature_shards(Path(cache_dir), key, len(paths), world.size)
            world.barrier()
    return cached_features(encode, backbone, preprocess_cfg, paths, progress=world.is_main, **args)
