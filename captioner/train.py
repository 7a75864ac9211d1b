"""Training: `fit()` runs the loop, validates on CIDEr each epoch, keeps the best checkpoint,
stops early, and resumes after a crash. The same code runs on one CPU, one GPU, or many
processes under torchrun (DistributedDataParallel: NCCL on GPUs, gloo on CPU).

With a frozen CNN (the default) the image features are computed once into an on-disk cache and
an epoch costs only the decoder. `fine_tune_cnn` trains the decoder on cached features for
`fine_tune_after_epochs` epochs, then the CNN too (at its own, lower learning rate) on augmented
images, as the Show and Tell authors did.

What resuming relies on: the sampler's order depends only on (seed, epoch), augmentation only on
(seed, epoch, item), and dropout on each rank's torch RNG, which last.safetensors keeps per rank.
A run killed at any point and resumed continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .api import Captioner
from .checkpoint import atomic_write, fingerprint, load_module_state, read_checkpoint, save_tensors, state_with_prefix
from .config import (DataConfig, DecodeConfig, ModelConfig, PreprocessConfig, TrainConfig, check_config,
                     from_dict, to_dict)
from .datasets import CaptionTokens, ImageCaptions, holdout_split, load_split, pad_tokens, validation_split
from .distributed import World, init_world, parse_device, rank_device
from .encoder import build_backbone
from .evaluate import caption_records, require_java, score_captions
from .features import default_cache_dir, feature_cache
from .init_from import (ARCHITECTURE, check_architecture, extended_decoder_state, model_config_from, option_name,
                        read_initial_checkpoint)
from .model import CaptionDecoder, caption_loss
from .preprocess import ImageInputs, collate_images, open_image
from .vocab import Vocabulary

LAST_FILE, BEST_DIR, METRICS_FILE, CURVES_FILE = "last.safetensors", "best", "metrics.jsonl", "curves.png"
VALIDATION_DECODE = DecodeConfig(method="greedy", max_len=20)


# ---------------------------------------------------------------------------------------------
# Data
def load_splits(cfg: DataConfig, seed: int) -> tuple[list[ImageCaptions], list[ImageCaptions]]:
    """Train and validation records; a dataset without a validation split holds out part of train."""
    train = load_split(cfg, cfg.train_split)
    val_split = validation_split(cfg)
    if val_split:
        return train, load_split(cfg, val_split)
    return holdout_split(train, cfg.holdout_fraction, seed)


def training_records(data_cfg: DataConfig, cfg: TrainConfig
                     ) -> tuple[list[ImageCaptions], list[ImageCaptions]]:
    """The exact records training uses (and `captioner prepare` caches): val_images caps val."""
    train, val = load_splits(data_cfg, cfg.seed)
    return train, val[: cfg.val_images] if cfg.val_images else val


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
    changes = []
    for saved, now in ((info.get("train", {}), to_dict(cfg)), (info.get("data", {}), to_dict(data_cfg)),
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
        super().__init__([records[tokens[i][0]].path for i in range(len(tokens))], augment.cfg)
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


# ---------------------------------------------------------------------------------------------
# Schedule and model wrapping
def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """The learning rate of every step, as PyTorch schedulers stepped once per optimiser step:
    linear warm-up over `warmup_steps`, then cosine (to 5 % at the last step), step (times
    lr_step_gamma every lr_step_epochs epochs) or constant."""
    warmup = cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch - warmup)
        schedule = partial(cosine_factor, total=total)
    elif cfg.lr_schedule == "step":
        # Counted from the first step of the run, warm-up included (the epochs are the data's).
        schedule = partial(step_factor, offset=warmup, steps_per_epoch=max(1, steps_per_epoch),
                           every=cfg.lr_step_epochs, gamma=cfg.lr_step_gamma)
    else:
        schedule = constant_factor
    main = LambdaLR(optimizer, schedule)
    if not warmup:
        return main
    return SequentialLR(optimizer, [LambdaLR(optimizer, partial(warmup_factor, steps=warmup)), main],
                        milestones=[warmup])


def warmup_factor(step: int, steps: int) -> float:
    return (step + 1) / steps


def cosine_factor(step: int, total: int) -> float:
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


def step_factor(step: int, offset: int, steps_per_epoch: int, every: int, gamma: float) -> float:
    return gamma ** (((step + offset) // steps_per_epoch) // every)


def constant_factor(step: int) -> float:
    return 1.0


def same_layout(saved, expected) -> bool:
    """saved (JSON from a training state) has expected's keys, list lengths and value types: a
    scheduler's state_dict is loaded into its __dict__, so nothing else may come in."""
    if isinstance(expected, dict):
        return isinstance(saved, dict) and saved.keys() == expected.keys() and all(
            same_layout(saved[k], v) for k, v in expected.items())
    if isinstance(expected, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(expected) and all(
            same_layout(a, b) for a, b in zip(saved, expected))
    if isinstance(expected, bool) or expected is None:
        return type(saved) is type(expected)
    if isinstance(expected, (int, float)):
        return type(saved) in (int, float) and math.isfinite(saved)
    return False


class EndToEnd(nn.Module):
    """CNN + decoder as one module, so that DDP syncs both in one set of gradient buckets."""

    def __init__(self, encoder: nn.Module, decoder: CaptionDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, packed: bool = False) -> torch.Tensor:
        return self.decoder(self.encoder(images), tokens, packed)                  # (B, T, V) or (N, V)

    def train(self, mode: bool = True) -> "EndToEnd":
        super().train(mode)
        # BatchNorm keeps its ImageNet statistics (its scale and shift still learn): batches of a
        # few images per process estimate them badly, and frozen statistics keep every rank's CNN
        # identical without syncing buffers.
        self.encoder.eval()
        return self


# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig,
                 world: World | None = None):
        cfg = check_config(cfg)          # types and ranges (a misspelled --lr-schedule, say)
        self.cfg, self.data_cfg = cfg, data_cfg
        self.out = Path(cfg.output)
        device = parse_device(cfg.device)
        self.world = world or init_world(device)
        self.device = rank_device(device, self.world)
        self.train_records, self.val_records = training_records(data_cfg, cfg)
        start = read_initial_checkpoint(cfg.init_from) if cfg.init_from else None
        data_sha256 = records_digest(self.train_records, self.val_records)
        resume = self.read_last()
        if resume:
            changes = resume_differences(resume[1], cfg, data_cfg, model_cfg, start, data_sha256)
            if changes:
                raise ValueError(f"--resume: {self.out / LAST_FILE} was saved with other options or data: "
                                 f"{'; '.join(changes)}. Resume with the same ones, or start a new "
                                 "run in another --output")
            vocab = Vocabulary(resume[1]["vocab"])
            model_cfg = from_dict(ModelConfig, resume[1]["model"])
        elif start:
            check_architecture(model_cfg, start)
            model_cfg = model_config_from(start, {"dropout": model_cfg.dropout})
            vocab = start.vocab.extended((c for r in self.train_records for c in r.captions),
                                         data_cfg.min_word_count)
        else:
            vocab = Vocabulary.build((c for r in self.train_records for c in r.captions),
                                     data_cfg.min_word_count)
        # The same initial weights in every process, and the same as a one-process run.
        torch.manual_seed(cfg.seed)
        self.captioner = Captioner.create(model_cfg, vocab, pretrained=start is None,
                                          preprocess_cfg=start.preprocess if start else None)
        self.captioner.info = {"dataset": data_cfg.dataset, "train": to_dict(cfg), "data": to_dict(data_cfg),
                               "data_sha256": data_sha256}
        if start:
            # The checkpoint's CNN (a resumed run's own, when it fine-tunes, comes in load_last).
            load_module_state(self.captioner.encoder, start.tensors, "encoder.", str(start.path))
            if not resume:
                self.captioner.decoders[0].load_state_dict(extended_decoder_state(start, vocab))
            self.captioner.decode_cfg = start.decode
            self.captioner.info["started_from"] = {"sha256": fingerprint(start.path), "vocab_size": len(start.vocab),
                                                   "dataset": start.info.get("dataset")}
        self.captioner.encoder.requires_grad_(cfg.fine_tune_cnn)
        self.captioner.to(self.device)
        self.vocab, self.model_cfg = vocab, self.captioner.model_cfg
        self.decoder = self.captioner.decoders[0]
        self.prepare_data()
        self.build_optimizer()
        # Dropout masks differ between ranks, as they do between the items of one big batch. Seeded
        # after the feature cache: building it draws from the RNG, and a rerun finds it built.
        torch.manual_seed(cfg.seed + self.world.rank)
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_cider": -1.0,
                      "bad_epochs": 0, "stopped": False, "epoch_loss_sum": 0.0, "epoch_loss_steps": 0,
                      "unreadable_images": 0}
        self.model: nn.Module | None = None      # what train_step runs: decoder or EndToEnd, maybe in DDP
        self.uses_images = False
        if resume:
            self.load_last(*resume)

    # -- data ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        cfg = self.cfg
        if cfg.batch_size % self.world.size:
            raise ValueError(f"--batch-size {cfg.batch_size} is the global batch: it must be a "
                             f"multiple of the number of processes ({self.world.size})")
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        features = partial(feature_cache, self.captioner.encoder, self.model_cfg.backbone,
                           self.captioner.preprocess_cfg, cache_dir=cache_dir, world=self.world,
                           device=self.device, num_workers=cfg.num_workers)
        # Cached features train the decoder while the CNN is frozen (when fine-tuning: the settling
        # epochs), and their mask of readable images decides which images fine-tuning reads.
        self.train_features, usable = features(self.train_records)
        self.mirrored_features = None
        if cfg.flip_augment:
            self.mirrored_features, mirrored_usable = features(self.train_records, flipped=True)
            usable = usable & mirrored_usable
        self.val_features, self.val_usable = features(self.val_records)
        if not self.val_usable.any():
            raise ValueError(f"no readable validation image (of {len(self.val_records)}): the best "
                             "checkpoint and early stopping are chosen on validation CIDEr")
        self.tokens = CaptionTokens(self.train_records, self.vocab, self.data_cfg.max_caption_len, usable)
        if len(self.tokens) == 0:
            raise ValueError("no training captions with a readable image")
        self.per_rank = cfg.batch_size // self.world.size
        self.sampler = ResumableSampler(self.tokens, self.world.size, self.world.rank, cfg.seed)
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.per_rank)
        # Private generators: starting a loader must not draw from the global torch RNG, which
        # drives dropout and is restored on resume.
        self.feature_items = FlipChoice(self.tokens, cfg.seed, enabled=cfg.flip_augment)
        self.feature_loader = DataLoader(
            self.feature_items, batch_size=self.per_rank, sampler=self.sampler, generator=torch.Generator(),
            collate_fn=partial(feature_batch, features=self.train_features, pad_id=self.vocab.pad_id,
                               mirrored_features=self.mirrored_features))
        if cfg.fine_tune_cnn:
            self.images = AugmentedImages(self.tokens, self.train_records,
                                          Augment(self.captioner.preprocess_cfg, cfg.seed))
            self.image_loader = DataLoader(
                self.images, batch_size=self.per_rank, sampler=self.sampler, generator=torch.Generator(),
                collate_fn=partial(image_batch, tokens=self.tokens, pad_id=self.vocab.pad_id),
                num_workers=cfg.num_workers,
                pin_memory=self.device.type == "cuda")

    def begin_epoch(self, epoch: int) -> DataLoader:
        """Position the sampler (part-way into the epoch after a resume), choose cached features
        or images for this epoch, and wrap the model to match."""
        self.sampler.set_position(epoch, self.state["step_in_epoch"] * self.per_rank)
        uses_images = self.cfg.fine_tune_cnn and epoch >= self.cfg.fine_tune_after_epochs
        if self.model is None or uses_images != self.uses_images:
            self.model, self.uses_images = self.wrap(uses_images), uses_images
        if uses_images:
            self.images.epoch = epoch
            return self.image_loader
        self.feature_items.epoch = epoch
        return self.feature_loader

    def wrap(self, uses_images: bool) -> nn.Module:
        module = EndToEnd(self.captioner.encoder, self.decoder) if uses_images else self.decoder
        if self.world.size == 1:
            return module
        # Every parameter takes part in every step, so no find_unused_parameters (a graph walk per
        # step): the frozen phase leaves the CNN out of the wrapped module instead.
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda"
                                       else None)

    # -- optimisation -------------------------------------------------------------------------
    def build_optimizer(self) -> None:
        cfg = self.cfg
        groups = [{"params": list(self.decoder.parameters()), "lr": cfg.lr, "name": "decoder"}]
        if cfg.fine_tune_cnn:
            groups.append({"params": list(self.captioner.encoder.parameters()), "lr": cfg.cnn_lr, "name": "cnn"})
        self.optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        # The CNN's group gets no gradients before fine-tuning starts, so Adam leaves it alone.
        self.scheduler = lr_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def train_step(self, inputs: torch.Tensor, tokens: torch.Tensor) -> float:
        """One optimiser step on this rank's share of the global batch; returns the mean loss
        per word over the whole global batch."""
        cfg, pad_id = self.cfg, self.vocab.pad_id
        self.model.train()
        inputs = inputs.to(self.device, non_blocking=True)     # features (B, D) or images (B, 3, S, S)
        tokens = tokens.to(self.device, non_blocking=True)     # (B, T)
        fed = self.scheduled_inputs(inputs, tokens)            # (B, T): tokens, some replaced by samples
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            logits = self.model(inputs, fed, packed=True)      # (N, V): real words only
        loss = caption_loss(logits, tokens, pad_id, cfg.label_smoothing)   # mean over this rank's words
        words = (tokens[:, 1:] != pad_id).sum()
        loss_sum = loss * words
        totals = torch.stack([loss_sum.detach(), words.to(loss.dtype)])     # (2,) loss sum, word count
        if self.world.size > 1:
            dist.all_reduce(totals)
        # DDP averages gradients over the ranks, so scaling by size / (all ranks' words) makes the
        # update the gradient of the mean loss over every word of the global batch: the step one
        # process takes on the whole batch, however the words are spread over the ranks.
        objective = loss_sum * (self.world.size / totals[1])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(totals[0] / totals[1])

    def skipped(self, unreadable: list) -> None:
        """Count the photos fine-tuning could not read (this process's); warn at the first."""
        if not self.state["unreadable_images"]:
            index, error = unreadable[0]
            warnings.warn(f"fine-tuning: skipping unreadable images, counted in metrics.jsonl "
                          f"(first: {self.images.items[index]}: {error.reason})", stacklevel=2)
        self.state["unreadable_images"] += len(unreadable)

    def sampling_probability(self) -> float:
        """Scheduled sampling's replacement probability now: linear from 0 to its maximum over the
        first `scheduled_sampling_ramp` epochs."""
        cfg = self.cfg
        if cfg.scheduled_sampling <= 0:
            return 0.0
        progress = self.state["global_step"] / max(1, cfg.scheduled_sampling_ramp * self.steps_per_epoch)
        return cfg.scheduled_sampling * min(1.0, progress)

    @torch.no_grad()
    def scheduled_inputs(self, inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The words fed to the LSTM. With scheduled sampling, each word after <start> is replaced
        with probability p by a word drawn from the model's prediction at that position, made by
        a teacher-forced pass without gradients (the two-pass form of Duckworth et al. 2019, so
        the LSTM still runs over whole sequences at once). Padding is never replaced."""
        p = self.sampling_probability()
        if p <= 0:
            return tokens
        targets = tokens[:, 1:]                                                   # (B, T-1)
        replace = (torch.rand(targets.shape, device=tokens.device) < p) & (targets != self.vocab.pad_id)
        if not replace.any():
            return tokens
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            features = self.captioner.encoder(inputs) if self.uses_images else inputs
            hidden = self.decoder.hidden_states(features, tokens)[:, :-1][replace]   # (n, H)
            # The readout and the draw only where a word is replaced: a small share of the batch.
            logits = self.decoder.readout(self.decoder.dropout(hidden)).float()       # (n, V)
        # Never <pad> (it would end the caption early: lengths come from the words fed) nor <start>.
        logits[:, [self.vocab.pad_id, self.vocab.bos_id]] = float("-inf")
        fed = tokens.clone()
        fed[:, 1:][replace] = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
        return fed                                                                # (B, T)

    # -- validation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        """Greedy captions of the validation images, each rank captioning its share, scored on
        rank 0 (BLEU-4, CIDEr) once all captions are gathered; every rank gets the scores."""
        self.captioner.eval()
        mine = range(self.world.rank, len(self.val_records), self.world.size)
        if self.uses_images:
            # The CNN has changed since the cache was made: encode the images again.
            captions = caption_records(self.captioner, [self.val_records[i] for i in mine],
                                       VALIDATION_DECODE, num_workers=self.cfg.num_workers, progress=False)
        else:
            rows = [i for i in mine if self.val_usable[i]]
            captions = {}
            for start in range(0, len(rows), 256):
                chunk = rows[start:start + 256]
                features = torch.from_numpy(np.asarray(self.val_features[chunk], dtype=np.float32))  # (n, D)
                for i, cap in zip(chunk, self.captioner.caption_features(features.to(self.device),
                                                                          VALIDATION_DECODE)):
                    captions[self.val_records[i].image_id] = cap.text
        if self.world.size > 1:
            gathered = [None] * self.world.size
            dist.all_gather_object(gathered, captions)
            captions = {k: v for part in gathered for k, v in part.items()}
        scores = {}
        if self.world.is_main and captions:
            refs = {r.image_id: r.captions for r in self.val_records if r.image_id in captions}
            scores = score_captions(refs, captions, metrics=("BLEU-4", "CIDEr"))
        if self.world.size > 1:
            box = [scores]
            dist.broadcast_object_list(box, src=0)
            scores = box[0]
        return scores

    # -- checkpoints --------------------------------------------------------------------------
    def rng_states(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's torch RNG state (CPU, and the GPU's on CUDA), gathered on all ranks."""
        mine = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world.size == 1:
            return [mine]
        states = [None] * self.world.size
        dist.all_gather_object(states, mine)
        return states

    def save_last(self) -> None:
        """Everything needed to continue: weights, optimizer, schedule position, every rank's RNG.
        All ranks call it (the RNG states are gathered); rank 0 writes."""
        rng = self.rng_states()
        if not self.world.is_main:
            return
        tensors = state_with_prefix("decoders.0.", self.decoder)
        if self.cfg.fine_tune_cnn:
            tensors.update(state_with_prefix("encoder.", self.captioner.encoder))
        # safetensors holds tensors only: Adam's per-parameter tensors (step, exp_avg, exp_avg_sq)
        # go there, its param_groups and any non-tensor state into the JSON header.
        optimizer_state = self.optimizer.state_dict()
        optim_json = {"param_groups": optimizer_state["param_groups"], "scalars": {}}
        for idx, slots in optimizer_state["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{idx}.{name}"] = value
                else:
                    optim_json["scalars"][f"{idx}.{name}"] = value
        for rank, states in enumerate(rng):
            tensors.update({f"rng.{kind}.{rank}": state for kind, state in states.items()})
        meta = {**self.captioner.header(), "trainer": {**self.state, "world_size": self.world.size},
                "optimizer": optim_json, "scaler": self.scaler.state_dict() if self.use_amp else {},
                "scheduler": self.scheduler.state_dict()}
        save_tensors(self.out / LAST_FILE, tensors, meta)

    def read_last(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        path = self.out / LAST_FILE
        if not self.cfg.resume:
            return None
        if not path.is_file():
            if self.world.is_main:
                warnings.warn(f"--resume: no {path} yet, starting fresh", stacklevel=3)
            return None
        checkpoint = read_checkpoint(path, training_state=True)
        return checkpoint.tensors, checkpoint.meta

    def load_last(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        source = str(self.out / LAST_FILE)
        load_module_state(self.decoder, tensors, "decoders.0.", source)
        if self.cfg.fine_tune_cnn and any(k.startswith("encoder.") for k in tensors):
            load_module_state(self.captioner.encoder, tensors, "encoder.", source)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for key, value in meta["optimizer"]["scalars"].items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        # load_state_dict moves each slot to its parameter's device (and keeps `step` as Adam wants).
        try:
            self.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        except ValueError as exc:
            raise ValueError(f"{source}: its optimizer state does not fit this run (saved "
                             f"{'with' if len(meta['optimizer']['param_groups']) > 1 else 'without'} "
                             f"--fine-tune-cnn): {exc}") from None
        if meta.get("scaler") and self.use_amp:
            self.scaler.load_state_dict(meta["scaler"])
        if "scheduler" not in meta:
            # Saved before the schedule was a PyTorch scheduler: the same schedule, stepped to here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # "lr_scheduler.step() before optimizer.step()"
                for _ in range(meta["trainer"].get("global_step", 0)):
                    self.scheduler.step()
        elif same_layout(meta["scheduler"], self.scheduler.state_dict()):
            self.scheduler.load_state_dict(meta["scheduler"])
        else:
            raise ValueError(f"{source}: its learning-rate schedule state does not fit this run's "
                             f"--lr-schedule {self.cfg.lr_schedule} --warmup-steps {self.cfg.warmup_steps}")
        trainer = meta["trainer"]
        self.state.update({k: v for k, v in trainer.items() if k in self.state})
        rank = self.world.rank
        if trainer.get("world_size") == self.world.size and f"rng.cpu.{rank}" in tensors:
            torch.set_rng_state(tensors[f"rng.cpu.{rank}"])
            if self.device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], self.device)
        else:
            # Another number of processes than the saved run: new, still seeded dropout streams.
            torch.manual_seed(self.cfg.seed + rank + 1_000_003 * self.state["global_step"])

    def save_best(self, scores: dict[str, float]) -> None:
        if self.world.is_main:
            # The epoch's number as metrics.jsonl counts (1 = the first), not the 0-based index.
            self.captioner.save(self.out / BEST_DIR, info={"val_scores": scores,
                                                            "epoch": self.state["epoch"] + 1})

    def log(self, record: dict) -> None:
        if self.world.is_main:
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> Path:
        from tqdm import tqdm

        cfg, state = self.cfg, self.state
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(
                {"model": to_dict(self.model_cfg), "data": to_dict(self.data_cfg), "train": to_dict(cfg),
                 "world_size": self.world.size}, indent=2))
        if self.world.is_main and cfg.resume:
            drop_records_after(self.out / METRICS_FILE, state["global_step"])
        while state["epoch"] < cfg.epochs and not state["stopped"]:
            epoch, first = state["epoch"], state["step_in_epoch"]
            loader = self.begin_epoch(epoch)
            started, recent = time.time(), []
            bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", disable=not self.world.is_main, dynamic_ncols=True)
            for i, (inputs, tokens, unreadable) in enumerate(loader, start=first):
                if unreadable:
                    self.skipped(unreadable)
                # Every rank steps or none does (DDP): a batch whose photos were all unreadable
                # (they were readable when the feature cache was built) is skipped everywhere.
                if not self.uses_images or self.world.all_true(inputs is not None):
                    recent.append(self.train_step(inputs, tokens))
                    state["epoch_loss_sum"] += recent[-1]
                    state["epoch_loss_steps"] += 1
                state["step_in_epoch"], state["global_step"] = i + 1, state["global_step"] + 1
                bar.set_postfix(loss=f"{np.mean(recent[-50:]):.3f}" if recent else "-",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.1e}")
                bar.update(1)
                if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0:
                    # Logged first: a kill between the two leaves a record past the checkpoint,
                    # which resuming drops and writes again.
                    self.log({"step": state["global_step"], "epoch": epoch + (i + 1) / self.steps_per_epoch,
                              "train_loss": float(np.mean(recent[-cfg.checkpoint_every:])) if recent else None})
                    self.save_last()
            bar.close()
            train_seconds = time.time() - started
            scores = self.validate()
            cider = scores["CIDEr"]
            improved = cider > state["best_cider"]
            if improved:
                self.save_best(scores)
                state["best_cider"], state["bad_epochs"] = cider, 0
            else:
                state["bad_epochs"] += 1
            state["stopped"] = 0 < cfg.patience <= state["bad_epochs"]
            steps = state["epoch_loss_steps"]
            record = {"epoch": epoch + 1, "step": state["global_step"],
                      "train_loss": state["epoch_loss_sum"] / steps if steps else None,
                      "val_BLEU-4": scores.get("BLEU-4"), "val_CIDEr": cider,
                      "lr": self.optimizer.param_groups[0]["lr"], "epoch_seconds": round(train_seconds, 1),
                      "sampling_probability": round(self.sampling_probability(), 4),
                      "unreadable_images": state["unreadable_images"]}
            state.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_loss_steps=0)
            self.log(record)
            self.save_last()
            if self.world.is_main:
                loss_text = f"{record['train_loss']:.3f}" if steps else "-"
                print(f"epoch {epoch + 1}: loss {loss_text}  val BLEU-4 {scores.get('BLEU-4', 0):.4f}  "
                      f"CIDEr {cider:.4f}{'  (best)' if improved else ''}  {train_seconds:.0f}s", flush=True)
                plot_curves(self.out / METRICS_FILE, self.out / CURVES_FILE)
        self.world.barrier()
        return self.out / BEST_DIR


def drop_records_after(metrics_file: Path, step: int) -> None:
    """Keep the records up to `step` (where a resumed run continues): the ones after it were
    written by the killed run and will be written again."""
    if metrics_file.is_file():
        lines = metrics_file.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            atomic_write(metrics_file, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))


def plot_curves(metrics_file: Path, png: Path) -> None:
    """Training loss and validation CIDEr / BLEU-4 against epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "val_CIDEr" not in r and r.get("train_loss") is not None]
    epochs = [r for r in rows if "val_CIDEr" in r]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    if steps:
        ax_loss.plot([r["epoch"] for r in steps], [r["train_loss"] for r in steps], lw=1, label="train (running)")
    ax_loss.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="train (epoch mean)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    ax_loss.legend()
    ax_val.plot([r["epoch"] for r in epochs], [r["val_CIDEr"] for r in epochs], "o-", label="CIDEr")
    ax_val.plot([r["epoch"] for r in epochs], [r["val_BLEU-4"] for r in epochs], "s-", label="BLEU-4")
    ax_val.set(xlabel="epoch", title="validation (greedy)")
    ax_val.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def fit(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig) -> Path:
    """Train and return the folder of the best checkpoint."""
    require_java()      # validation scores with it: say so now, not after the first epoch
    world = init_world(parse_device(train_cfg.device))
    try:
        return Trainer(model_cfg, data_cfg, train_cfg, world).fit()
    finally:
        world.close()


def prepare_features(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig
                     ) -> dict[str, tuple[int, int]]:
    """Build the feature cache that `captioner train` with the same options reads (same records,
    backbone, preprocessing, hence the same cache keys), sharded over the processes under
    torchrun. Returns {"train" | "val": (readable images, images)}."""
    device = parse_device(cfg.device)
    world = init_world(device)
    try:
        device = rank_device(device, world)
        train, val = training_records(data_cfg, cfg)
        backbone = build_backbone(model_cfg.backbone, pretrained=True)
        backbone.module.to(device)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        counts = {}
        views = [("train", train, False), ("val", val, False)]
        if cfg.flip_augment:
            views.append(("train mirrored", train, True))
        for split, records, flipped in views:
            _, readable = feature_cache(backbone.module, model_cfg.backbone, backbone.preprocess, records,
                                        cache_dir, world, device, cfg.num_workers, flipped=flipped)
            counts[split] = (int(readable.sum()), len(records))
        return counts
    finally:
        world.close()
