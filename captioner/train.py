"""Training: `fit()` runs the loop, validates on CIDEr each epoch, keeps the best checkpoint,
stops early, and resumes after a crash. The same code runs on one CPU, one GPU, or many
processes under torchrun (DistributedDataParallel: NCCL on GPUs, gloo on CPU).

With a frozen CNN (the default) the image features are computed once into an on-disk cache and
an epoch costs only the decoder. `fine_tune_cnn` trains end to end on augmented images.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .api import Captioner
from .checkpoint import load_tensors, save_tensors, state_with_prefix, load_module_state
from .config import DataConfig, DecodeConfig, ModelConfig, TrainConfig, from_dict, to_dict
from .datasets import (CaptionTokens, ImageCaptions, cached_features, holdout_split,
                       load_coco, load_flickr8k, merge_feature_shards, cache_key, pad_tokens)
from .evaluate import score_captions
from .model import caption_loss
from .preprocess import open_image, resize, to_tensor
from .vocab import Vocabulary

LAST_FILE, BEST_DIR, METRICS_FILE, CURVES_FILE = "last.safetensors", "best", "metrics.jsonl", "curves.png"


# ---------------------------------------------------------------------------------------------
# Distributed helpers: a world of one when not under torchrun.
@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "captioner" / "features"


# ---------------------------------------------------------------------------------------------
def load_splits(cfg: DataConfig, seed: int) -> tuple[list[ImageCaptions], list[ImageCaptions]]:
    """Train and validation records; COCO without a validation split holds out part of train."""
    if cfg.dataset == "flickr8k":
        return load_flickr8k(cfg.data_root, cfg.train_split), load_flickr8k(cfg.data_root, cfg.val_split)
    if cfg.dataset == "coco":
        train = load_coco(cfg.data_root, cfg.train_split, cfg.karpathy_json)
        if cfg.val_split:
            return train, load_coco(cfg.data_root, cfg.val_split, cfg.karpathy_json)
        return holdout_split(train, cfg.holdout_fraction, seed)
    raise ValueError(f"unknown dataset {cfg.dataset!r} (flickr8k | coco)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at a global step: linear warm-up, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / total)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "step":
        return cfg.lr_step_gamma ** ((step // max(1, steps_per_epoch)) // cfg.lr_step_epochs)
    return 1.0


class Augment:
    """Training-time image augmentation for CNN fine-tuning (picklable for DataLoader workers)."""

    def __init__(self, preprocess_cfg, seed: int):
        self.cfg, self.seed = preprocess_cfg, seed

    def __call__(self, path: str) -> torch.Tensor:
        image = open_image(path, self.cfg.image_size)
        rng = random.Random()
        if rng.random() < 0.5:
            image = image.transpose(0)   # horizontal flip
        width, height = image.size
        scale = rng.uniform(0.8, 1.0)
        w, h = max(1, int(width * scale)), max(1, int(height * scale))
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        return to_tensor(resize(image.crop((left, top, left + w, top + h)), self.cfg), self.cfg)


class ImageTokens(torch.utils.data.Dataset):
    """(augmented image, tokens) pairs for end-to-end training."""

    def __init__(self, tokens: CaptionTokens, records: list[ImageCaptions], augment: Augment):
        self.tokens, self.records, self.augment = tokens, records, augment

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        row, ids = self.tokens[i]
        return self.augment(self.records[row].path), ids


# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig):
        self.cfg, self.data_cfg = cfg, data_cfg
        self.out = Path(cfg.output)
        self.world = init_world(cfg.device)
        self.device = torch.device(cfg.device if not cfg.device.startswith("cuda") or self.world.size == 1
                                   else f"cuda:{self.world.local_rank}")
        seed_everything(cfg.seed + self.world.rank)
        self.train_records, self.val_records = load_splits(data_cfg, cfg.seed)
        if cfg.val_images:
            self.val_records = self.val_records[: cfg.val_images]
        resume_from = self.out / LAST_FILE if cfg.resume and (self.out / LAST_FILE).is_file() else None
        if cfg.resume and resume_from is None and self.world.is_main:
            warnings.warn(f"--resume: no {self.out / LAST_FILE} yet, starting fresh", stacklevel=2)
        if resume_from:
            _, meta = load_tensors(resume_from)
            vocab = Vocabulary(meta["vocab"])
            model_cfg = from_dict(ModelConfig, meta["model"])
        else:
            vocab = Vocabulary.build((c for r in self.train_records for c in r.captions),
                                     data_cfg.min_word_count)
        self.captioner = Captioner.create(model_cfg, vocab, pretrained=True)
        self.captioner.info = {"dataset": data_cfg.dataset, "train": to_dict(cfg), "data": to_dict(data_cfg)}
        self.captioner.to(self.device)
        self.vocab, self.model_cfg = vocab, self.captioner.model_cfg
        self.decoder = self.captioner.decoders[0]
        self.prepare_data()
        self.build_optimizer()
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_cider": -1.0,
                      "bad_epochs": 0, "stopped": False}
        if resume_from:
            self.load_last(resume_from)

    # -- data ---------------------------------------------------------------------------------
    def features_for(self, records: list[ImageCaptions]) -> tuple[np.ndarray, np.ndarray]:
        cache_dir = Path(self.cfg.cache_dir) if self.cfg.cache_dir else default_cache_dir()
        paths = [r.path for r in records]
        backbone, pre = self.model_cfg.backbone, self.captioner.preprocess_cfg
        encoder = self.captioner.encoder.eval()

        @torch.inference_mode()
        def encode(images):
            return encoder(images.to(self.device)).float()

        args = dict(cache_dir=cache_dir, batch_size=64, num_workers=self.cfg.num_workers,
                    progress=self.world.is_main)
        if self.world.size == 1:
            return cached_features(encode, backbone, pre, paths, **args)
        key = cache_key(backbone, pre, paths)
        if not (cache_dir / f"features-{key}.json").is_file():
            # Each rank encodes its share of the images; rank 0 merges them.
            cached_features(encode, backbone, pre, paths, shard=(self.world.rank, self.world.size), **args)
            self.world.barrier()
            if self.world.is_main:
                merge_feature_shards(cache_dir, key, len(paths), self.world.size)
            self.world.barrier()
        return cached_features(encode, backbone, pre, paths, **{**args, "progress": False})

    def prepare_data(self) -> None:
        cfg = self.cfg
        max_len = self.data_cfg.max_caption_len
        if cfg.fine_tune_cnn:
            self.train_features = self.val_features = None
            usable = None
        else:
            self.train_features, usable = self.features_for(self.train_records)
            self.val_features, self.val_usable = self.features_for(self.val_records)
        self.tokens = CaptionTokens(self.train_records, self.vocab, max_len, usable)
        if len(self.tokens) == 0:
            raise RuntimeError("no training captions with a readable image")
        self.sampler = DistributedSampler(self.tokens, num_replicas=self.world.size, rank=self.world.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=False)
        per_rank = max(1, cfg.batch_size // self.world.size)
        if cfg.fine_tune_cnn:
            dataset = ImageTokens(self.tokens, self.train_records,
                                  Augment(self.captioner.preprocess_cfg, cfg.seed))
            collate = self.collate_images
            workers = cfg.num_workers
        else:
            dataset, collate, workers = self.tokens, self.collate_features, 0
        self.loader = DataLoader(dataset, batch_size=per_rank, sampler=self.sampler,
                                 collate_fn=collate, num_workers=workers)
        self.steps_per_epoch = len(self.loader)

    def collate_features(self, batch):
        rows = np.array([row for row, _ in batch])
        features = torch.from_numpy(np.asarray(self.train_features[rows], dtype=np.float32))  # (B, D)
        return features, pad_tokens([ids for _, ids in batch], self.vocab.pad_id)

    def collate_images(self, batch):
        return torch.stack([img for img, _ in batch]), pad_tokens([ids for _, ids in batch], self.vocab.pad_id)

    # -- optimisation -------------------------------------------------------------------------
    def build_optimizer(self) -> None:
        cfg = self.cfg
        self.model = self.decoder
        if self.world.size > 1:
            self.model = DistributedDataParallel(self.decoder, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        groups = [{"params": list(self.decoder.parameters()), "lr": cfg.lr, "name": "decoder"}]
        if cfg.fine_tune_cnn:
            self.encoder_ddp = self.captioner.encoder
            if self.world.size > 1:
                self.encoder_ddp = DistributedDataParallel(self.captioner.encoder,
                                                           device_ids=[self.device.index] if self.device.type == "cuda" else None)
            groups.append({"params": list(self.captioner.encoder.parameters()), "lr": cfg.cnn_lr, "name": "cnn"})
        self.optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        self.base_lrs = [g["lr"] for g in groups]
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def set_lr(self) -> None:
        factor = lr_factor(self.cfg, self.state["global_step"], self.steps_per_epoch)
        cnn_on = self.cfg.fine_tune_cnn and self.state["epoch"] >= self.cfg.fine_tune_after_epochs
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor if (group["name"] == "decoder" or cnn_on) else 0.0

    def train_step(self, inputs: torch.Tensor, tokens: torch.Tensor) -> float:
        cfg = self.cfg
        self.decoder.train()
        inputs, tokens = inputs.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True)
        self.set_lr()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            if cfg.fine_tune_cnn:
                cnn_on = self.state["epoch"] >= cfg.fine_tune_after_epochs
                self.captioner.encoder.train(cnn_on)
                with torch.set_grad_enabled(cnn_on):
                    features = self.encoder_ddp(inputs)
            else:
                features = inputs
            logits = self.model(features, tokens)                              # (B, T, V)
            loss = caption_loss(logits, tokens, self.vocab.pad_id, cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    # -- validation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        """Greedy captions of the validation images (sharded over ranks) -> BLEU-4 and CIDEr."""
        self.captioner.eval()
        mine = list(range(self.world.rank, len(self.val_records), self.world.size))
        greedy = DecodeConfig(method="greedy", max_len=20)
        captions: dict[str, str] = {}
        if self.val_features is not None:
            mine = [i for i in mine if self.val_usable[i]]
            for start in range(0, len(mine), 256):
                rows = mine[start:start + 256]
                features = torch.from_numpy(np.asarray(self.val_features[rows], dtype=np.float32))
                for i, cap in zip(rows, self.captioner.caption_features(features.to(self.device), greedy)):
                    captions[self.val_records[i].image_id] = cap.text
        else:
            from .evaluate import caption_records
            captions = caption_records(self.captioner, [self.val_records[i] for i in mine], greedy,
                                       num_workers=self.cfg.num_workers, progress=False)
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
    def save_last(self) -> None:
        """Everything needed to continue: weights, optimizer, RNG, epoch and position."""
        if not self.world.is_main:
            return
        tensors = state_with_prefix("decoders.0.", self.decoder)
        if self.cfg.fine_tune_cnn:
            tensors.update(state_with_prefix("encoder.", self.captioner.encoder))
        optimizer_state = self.optimizer.state_dict()
        optim_json = {"param_groups": optimizer_state["param_groups"], "scalars": {}}
        for idx, slots in optimizer_state["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{idx}.{name}"] = value
                else:
                    optim_json["scalars"][f"{idx}.{name}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        py_state = random.getstate()
        meta = {**self.captioner.header(), "trainer": self.state, "optimizer": optim_json,
                "scaler": self.scaler.state_dict() if self.use_amp else {},
                "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
                "rng_numpy_seed": int(np.random.get_state()[1][0])}
        save_tensors(self.out / LAST_FILE, tensors, meta)

    def load_last(self, path: Path) -> None:
        tensors, meta = load_tensors(path)
        load_module_state(self.decoder, tensors, "decoders.0.", str(path))
        if self.cfg.fine_tune_cnn and any(k.startswith("encoder.") for k in tensors):
            load_module_state(self.captioner.encoder, tensors, "encoder.", str(path))
        optim_json = meta["optimizer"]
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value.to(self.device)
        for key, value in optim_json["scalars"].items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        # safetensors loads floats as float32 (load_tensors); Adam's `step` must stay float32 too.
        self.optimizer.load_state_dict({"state": state, "param_groups": optim_json["param_groups"]})
        if meta.get("scaler") and self.use_amp:
            self.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"].to(torch.uint8))
        version, internal, gauss = meta["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        self.state.update(meta["trainer"])

    def save_best(self, scores: dict[str, float]) -> None:
        if self.world.is_main:
            self.captioner.save(self.out / BEST_DIR, info={"val_scores": scores,
                                                            "epoch": self.state["epoch"]})

    def log(self, record: dict) -> None:
        if not self.world.is_main:
            return
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
        while state["epoch"] < cfg.epochs and not state["stopped"]:
            epoch = state["epoch"]
            self.sampler.set_epoch(epoch)
            skip = state["step_in_epoch"]
            started, losses = time.time(), []
            bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", disable=not self.world.is_main, dynamic_ncols=True)
            for i, (inputs, tokens) in enumerate(self.loader):
                if i < skip:
                    continue     # resuming mid-epoch: same permutation, continue where we were
                losses.append(self.train_step(inputs, tokens))
                state["step_in_epoch"], state["global_step"] = i + 1, state["global_step"] + 1
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.1e}")
                bar.update(1)
                if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0:
                    self.save_last()
                    self.log({"step": state["global_step"], "epoch": epoch + (i + 1) / self.steps_per_epoch,
                              "train_loss": float(np.mean(losses[-cfg.checkpoint_every:]))})
            bar.close()
            train_seconds = time.time() - started
            scores = self.validate()
            improved = scores.get("CIDEr", -1.0) > state["best_cider"]
            if improved:
                state["best_cider"], state["bad_epochs"] = scores["CIDEr"], 0
                self.save_best(scores)
            else:
                state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= cfg.patience
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            record = {"epoch": epoch + 1, "step": state["global_step"],
                      "train_loss": float(np.mean(losses)) if losses else None,
                      "val_BLEU-4": scores.get("BLEU-4"), "val_CIDEr": scores.get("CIDEr"),
                      "lr": self.optimizer.param_groups[0]["lr"], "epoch_seconds": round(train_seconds, 1)}
            self.log(record)
            self.save_last()
            if self.world.is_main:
                print(f"epoch {epoch + 1}: loss {record['train_loss']:.3f}  val BLEU-4 "
                      f"{scores.get('BLEU-4', 0):.4f}  CIDEr {scores.get('CIDEr', 0):.4f}"
                      f"{'  (best)' if improved else ''}  {train_seconds:.0f}s", flush=True)
                plot_curves(self.out / METRICS_FILE, self.out / CURVES_FILE)
        self.world.barrier()
        return self.out / BEST_DIR


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
    return Trainer(model_cfg, data_cfg, train_cfg).fit()
