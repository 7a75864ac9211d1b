"""What each training step reads: the captions as token ids, the cached CNN features of their
photos (and of the mirrored photos with --flip-augment) or, when the CNN is fine-tuned, the photos
themselves, augmented; in an order that depends only on (seed, epoch), shared out over the ranks,
and able to start part-way into an epoch when a run resumes.

What resuming relies on: the sampler's order depends only on (seed, epoch), augmentation and the
mirrored-features choice only on (seed, epoch, item), and no loader draws from the global torch
RNG (which drives dropout and comes back from the checkpoint).
"""
from __future__ import annotations

import itertools
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .api import Captioner
from .config import DataConfig, PreprocessConfig, TrainConfig
from .datasets import CaptionTokens, ImageCaptions, pad_tokens
from .distributed import World
from .encoder import LiteTop, split_for_top_tuning
from .features import default_cache_dir, feature_cache
from .preprocess import ImageInputs, collate_images, open_image
from .vocab import Vocabulary


class ResumableSampler(DistributedSampler):
    """DistributedSampler (a (seed, epoch)-seeded shuffle, split into one shard per rank) that can
    start an epoch part-way: resuming skips indices instead of loading batches and dropping them.

    With batch B/world per rank, the ranks' k-th batches together are exactly the k-th batch of B
    that a single process draws with the same seed, so the global batches do not depend on the
    number of processes (up to the few repeated items that pad the last batch to equal shards)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class Augment:
    """Random crop (80-100 % of each side) and horizontal flip for CNN fine-tuning.

    The draw depends only on (seed, epoch, item), never on which worker or process loads the item
    or on what ran before, so a resumed run sees exactly the images the uninterrupted one saw."""

    def __init__(self, preprocess_cfg: PreprocessConfig, seed: int):
        self.cfg, self.seed = preprocess_cfg, seed

    def __call__(self, path: str, epoch: int, item: int) -> Image.Image:
        """The photo at `path` flipped and cropped, as preprocessing then resizes it."""
        rng = np.random.default_rng([self.seed, epoch, item])
        image = open_image(path, self.cfg.image_size)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        width, height = image.size
        scale = rng.uniform(0.8, 1.0)
        w, h = max(1, int(width * scale)), max(1, int(height * scale))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        return image.crop((left, top, left + w, top + h))


class AugmentedImages(ImageInputs):
    """The package's image Dataset (admission, preprocessing; an unreadable file is an error
    item, not a crash) over each caption's photo, augmented by (seed, epoch, caption index).
    `epoch` is set by the trainer before each epoch's loader starts (workers get a copy then)."""

    def __init__(self, tokens: CaptionTokens, records: list[ImageCaptions], augment: Augment):
        super().__init__([records[row].path for row in tokens.rows], augment.cfg)
        self.augment = augment
        self.epoch = 0

    def __getitem__(self, i: int):
        self.transform = partial(self.augment, epoch=self.epoch, item=i)    # this item's draw
        return super().__getitem__(i)


class FlipChoice(Dataset):
    """(feature row, token ids, mirrored?) per caption: with a flip-augmented cache each caption
    sees the mirrored photo's features half of the time. Like Augment, the draw depends only on
    (seed, epoch, item), so a resumed run sees what the uninterrupted one saw."""

    def __init__(self, tokens: CaptionTokens, seed: int, enabled: bool):
        self.tokens, self.seed, self.enabled = tokens, seed, enabled
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[int, list[int], bool]:
        row, ids = self.tokens[i]
        mirrored = self.enabled and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5
        return row, ids, bool(mirrored)


def feature_batch(batch, features: np.ndarray, pad_id: int, mirrored_features: np.ndarray | None = None):
    rows = np.array([item[0] for item in batch])
    inputs = np.asarray(features[rows], dtype=np.float32)                          # (B, D)
    if mirrored_features is not None:
        mirrored = np.array([item[2] for item in batch])                           # (B,) bool
        if mirrored.any():
            inputs[mirrored] = np.asarray(mirrored_features[rows[mirrored]], dtype=np.float32)
    return torch.from_numpy(inputs), pad_tokens([item[1] for item in batch], pad_id), []   # (B, D), (B, T)


def image_batch(batch, tokens: CaptionTokens, pad_id: int):
    """AugmentedImages items -> (images (B, 3, S, S) or None, their captions' ids (B, T) or None,
    [(caption index, ImageLoadError)] of the unreadable ones)."""
    indices, images, errors = collate_images(batch)
    ids = pad_tokens([tokens[i][1] for i in indices], pad_id) if indices else None
    return images, ids, errors


def cached_part(encoder: nn.Module, backbone: str, cfg: TrainConfig, image_size: int
                ) -> tuple[nn.Module, str, LiteTop | None]:
    """What the feature cache of a run holds: (the module that computes it, its name, the trained
    top). The CNN's pooled features; with fine_tune_top, the activations entering the top blocks,
    which the top (sharing the CNN's modules) turns into features at every step."""
    if not cfg.fine_tune_top:
        return encoder, backbone, None
    bottom, top = split_for_top_tuning(encoder, cfg.fine_tune_top, image_size)
    return bottom, f"{backbone} below its last {cfg.fine_tune_top} blocks", top


class TrainingData:
    """The feature caches (built or read), the token dataset, the sampler and the two loaders:
    cached features (or, with fine_tune_top, activations below the top) while the CNN is frozen,
    augmented photos once it is fine-tuned. `cached` is cached_part's module and name."""

    def __init__(self, captioner: Captioner, vocab: Vocabulary, train: list[ImageCaptions],
                 val: list[ImageCaptions], data_cfg: DataConfig, cfg: TrainConfig, world: World,
                 device: torch.device, cached: tuple[nn.Module, str]):
        if cfg.batch_size % world.size:
            raise ValueError(f"--batch-size {cfg.batch_size} is the global batch: it must be a "
                             f"multiple of the number of processes ({world.size})")
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        features = partial(feature_cache, *cached, captioner.preprocess_cfg, cache_dir=cache_dir, world=world,
                           device=device, num_workers=cfg.num_workers)
        # Cached features train the decoder while the CNN is frozen (when fine-tuning: the settling
        # epochs), and their mask of readable images decides which images fine-tuning reads.
        self.train_features, usable = features(train)
        self.mirrored_features = None
        if cfg.flip_augment:
            self.mirrored_features, mirrored_usable = features(train, flipped=True)
            usable = usable & mirrored_usable
        self.val_features, self.val_usable = features(val)
        if not self.val_usable.any():
            raise ValueError(f"no readable validation image (of {len(val)}): the best "
                             "checkpoint and early stopping are chosen on validation CIDEr")
        self.tokens = CaptionTokens(train, vocab, data_cfg.max_caption_len, usable)
        if len(self.tokens) == 0:
            raise ValueError("no training captions with a readable image")
        self.per_rank = cfg.batch_size // world.size
        self.sampler = ResumableSampler(self.tokens, world.size, world.rank, cfg.seed)
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.per_rank)
        # Private generators: starting a loader must not draw from the global torch RNG.
        self.feature_items = FlipChoice(self.tokens, cfg.seed, enabled=cfg.flip_augment)
        self.feature_loader = DataLoader(
            self.feature_items, batch_size=self.per_rank, sampler=self.sampler, generator=torch.Generator(),
            collate_fn=partial(feature_batch, features=self.train_features, pad_id=vocab.pad_id,
                               mirrored_features=self.mirrored_features))
        if cfg.fine_tune_cnn:
            self.images = AugmentedImages(self.tokens, train, Augment(captioner.preprocess_cfg, cfg.seed))
            self.image_loader = DataLoader(
                self.images, batch_size=self.per_rank, sampler=self.sampler, generator=torch.Generator(),
                collate_fn=partial(image_batch, tokens=self.tokens, pad_id=vocab.pad_id),
                num_workers=cfg.num_workers, pin_memory=device.type == "cuda")

    def epoch(self, epoch: int, first_step: int, uses_images: bool) -> DataLoader:
        """The loader of an epoch's batches from its `first_step` on (part-way after a resume):
        batches of (features or images, token ids, [(item, ImageLoadError)] unreadable)."""
        self.sampler.set_position(epoch, first_step * self.per_rank)
        if uses_images:
            self.images.epoch = epoch
            return self.image_loader
        self.feature_items.epoch = epoch
        return self.feature_loader
