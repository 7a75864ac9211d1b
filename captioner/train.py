"""Training: `fit()` runs the loop, validates on CIDEr each epoch, keeps the best checkpoint,
stops early, and resumes after a crash. The same code runs on one CPU, one GPU, or many
processes under torchrun (DistributedDataParallel: NCCL on GPUs, gloo on CPU).

With a frozen CNN (the default) the image features are computed once into an on-disk cache and
an epoch costs only the decoder. `fine_tune_cnn` trains the decoder on cached features for
`fine_tune_after_epochs` epochs, then the CNN too (at its own, lower learning rate) on augmented
images, as the Show and Tell authors did. `fine_tune_top` trains only the CNN's last blocks, on
cached activations of the frozen blocks below them (usually from --init-from a trained model): the
steps stay cheap enough for a CPU.

The Trainer puts together parts that each do one job, in the order a run needs them:
    the model to start from   scratch, --init-from (init_from.py) or --resume (train_state.py)
    TrainingData              caches, tokens, sampler, loaders          (train_data.py)
    Optimisation              Adam, clipping, AMP, the LR schedule      (train_optim.py)
    validation_scores         greedy captions scored on CIDEr           (validation.py)
    training state            last.safetensors, the resume check       (train_state.py)
    RunLog                    metrics.jsonl, curves, a line per epoch   (train_log.py)
A run killed at any point and resumed continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .api import Captioner
from .checkpoint import fingerprint, load_module_state, state_with_prefix
from .config import DataConfig, ModelConfig, TrainConfig, check_config, from_dict, to_dict
from .datasets import ImageCaptions, holdout_split, load_split, validation_split
from .distributed import World, init_world, parse_device, rank_device
from .encoder import build_backbone
from .evaluate import require_java
from .features import default_cache_dir, feature_cache
from .init_from import check_architecture, extended_decoder_state, model_config_from, read_initial_checkpoint
from .model import CaptionDecoder, caption_loss
from .train_data import TrainingData, cached_part
from .train_log import RunLog
from .train_optim import Optimisation
from .train_state import (LAST_FILE, read_training_state, records_digest, restore_rng, resume_differences,
                          save_training_state)
from .validation import validation_scores
from .vocab import Vocabulary

BEST_DIR = "best"


# ---------------------------------------------------------------------------------------------
# The records a run trains and validates on
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
        resume = self.build_model(model_cfg)
        self.data = TrainingData(self.captioner, self.vocab, self.train_records, self.val_records, data_cfg, cfg,
                                 self.world, self.device, self.cached)
        # The training captions live on as token ids (self.data.tokens): their text goes, the
        # records keep their paths; ~230 MB less in every process at COCO size (bench_train_scale).
        for record in self.train_records:
            record.captions = []
        trained_cnn = self.top if self.top is not None else self.captioner.encoder
        self.optim = Optimisation(self.decoder, trained_cnn, cfg, self.device, self.data.steps_per_epoch)
        self.log = RunLog(self.out, writes=self.world.is_main)
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

    # -- the model to start from ----------------------------------------------------------------
    def build_model(self, model_cfg: ModelConfig) -> tuple[dict, dict] | None:
        """The captioner and vocabulary: new, from --init-from, or (with --resume) as saved, once
        the saved run is shown to be this one. Returns the saved training state, if any."""
        cfg, data_cfg = self.cfg, self.data_cfg
        start = read_initial_checkpoint(cfg.init_from) if cfg.init_from else None
        data_sha256 = records_digest(self.train_records, self.val_records)
        resume = read_training_state(self.out, self.world) if cfg.resume else None
        captions = (c for r in self.train_records for c in r.captions)
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
            vocab = start.vocab.extended(captions, data_cfg.min_word_count)
        else:
            vocab = Vocabulary.build(captions, data_cfg.min_word_count)
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
        # What the feature cache holds (module, name), and with --fine-tune-top the top that trains.
        cache_module, cache_name, self.top = cached_part(self.captioner.encoder, self.model_cfg.backbone, cfg,
                                                         self.captioner.preprocess_cfg.image_size)
        self.cached = (cache_module, cache_name)
        if self.top is not None:
            if cfg.fine_tune_cnn:
                raise ValueError("--fine-tune-top and --fine-tune-cnn: choose one (the top, or the whole CNN)")
            self.top.requires_grad_(True)
        return resume

    def begin_epoch(self, epoch: int):
        """This epoch's loader (part-way after a resume): cached features, or images once the CNN
        is fine-tuned, with the model wrapped to match."""
        uses_images = self.cfg.fine_tune_cnn and epoch >= self.cfg.fine_tune_after_epochs
        if self.model is None or uses_images != self.uses_images:
            self.model, self.uses_images = self.wrap(uses_images), uses_images
        return self.data.epoch(epoch, self.state["step_in_epoch"], uses_images)

    def input_encoder(self, uses_images: bool) -> nn.Module | None:
        """What turns a batch's inputs into features while training: the CNN (images), its top
        (cached activations), or nothing (cached features)."""
        return self.captioner.encoder if uses_images else self.top

    def wrap(self, uses_images: bool) -> nn.Module:
        encoder = self.input_encoder(uses_images)
        module = self.decoder if encoder is None else EndToEnd(encoder, self.decoder)
        if self.world.size == 1:
            return module
        # Every parameter takes part in every step, so no find_unused_parameters (a graph walk per
        # step): the frozen phase leaves the CNN out of the wrapped module instead.
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda"
                                       else None)

    # -- a step -----------------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, tokens: torch.Tensor) -> float:
        """One optimiser step on this rank's share of the global batch; returns the mean loss
        per word over the whole global batch."""
        cfg, pad_id = self.cfg, self.vocab.pad_id
        self.model.train()
        inputs = inputs.to(self.device, non_blocking=True)     # features (B, D), activations or images
        tokens = tokens.to(self.device, non_blocking=True)     # (B, T)
        fed = self.scheduled_inputs(inputs, tokens)            # (B, T): tokens, some replaced by samples
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.optim.use_amp):
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
        self.optim.step(loss_sum * (self.world.size / totals[1]))
        return float(totals[0] / totals[1])

    def skipped(self, unreadable: list) -> None:
        """Count the photos fine-tuning could not read (this process's); warn at the first."""
        if not self.state["unreadable_images"]:
            index, error = unreadable[0]
            warnings.warn(f"fine-tuning: skipping unreadable images, counted in metrics.jsonl "
                          f"(first: {self.data.images.items[index]}: {error.reason})", stacklevel=2)
        self.state["unreadable_images"] += len(unreadable)

    def sampling_probability(self) -> float:
        """Scheduled sampling's replacement probability now: linear from 0 to its maximum over the
        first `scheduled_sampling_ramp` epochs."""
        cfg = self.cfg
        if cfg.scheduled_sampling <= 0:
            return 0.0
        progress = self.state["global_step"] / max(1, cfg.scheduled_sampling_ramp * self.data.steps_per_epoch)
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
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.optim.use_amp):
            encoder = self.input_encoder(self.uses_images)
            features = inputs if encoder is None else encoder(inputs)
            hidden = self.decoder.hidden_states(features, tokens)[:, :-1][replace]   # (n, H)
            # The readout and the draw only where a word is replaced: a small share of the batch.
            logits = self.decoder.readout(self.decoder.dropout(hidden)).float()       # (n, V)
        # Never <pad> (it would end the caption early: lengths come from the words fed) nor <start>.
        logits[:, [self.vocab.pad_id, self.vocab.bos_id]] = float("-inf")
        fed = tokens.clone()
        fed[:, 1:][replace] = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
        return fed                                                                # (B, T)

    # -- validation and checkpoints ---------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        features = self.data.val_features
        if self.top is not None:
            features = self.top_features(features, self.data.val_usable)
        return validation_scores(self.captioner, self.val_records, features, self.data.val_usable,
                                 self.world, self.uses_images, self.cfg.num_workers)

    @torch.inference_mode()
    def top_features(self, activations: np.ndarray, usable: np.ndarray) -> np.ndarray:
        """The tuned CNN's features (N, D) of cached activations (N, C*h*w); zeros where unusable."""
        self.top.eval()
        features = np.zeros((len(activations), self.model_cfg.feature_dim), dtype=np.float32)
        rows = np.flatnonzero(usable)
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            batch = torch.from_numpy(np.asarray(activations[chunk], dtype=np.float32)).to(self.device)
            features[chunk] = self.top(batch).float().cpu().numpy()
        return features

    def save_last(self) -> None:
        """Everything needed to continue: weights, optimizer, schedule, position, every rank's RNG.
        All ranks call it (the RNG states are gathered); rank 0 writes."""
        tensors = state_with_prefix("decoders.0.", self.decoder)
        if self.cfg.fine_tune_cnn or self.cfg.fine_tune_top:
            tensors.update(state_with_prefix("encoder.", self.captioner.encoder))
        optim_tensors, optim_meta = self.optim.state()
        save_training_state(self.out, self.world, self.device, {**tensors, **optim_tensors},
                            {**self.captioner.header(), "trainer": dict(self.state), **optim_meta})

    def load_last(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        source = str(self.out / LAST_FILE)
        load_module_state(self.decoder, tensors, "decoders.0.", source)
        if (self.cfg.fine_tune_cnn or self.cfg.fine_tune_top) and any(k.startswith("encoder.") for k in tensors):
            load_module_state(self.captioner.encoder, tensors, "encoder.", source)
        self.optim.load_state(tensors, meta, source)
        self.state.update({k: v for k, v in meta["trainer"].items() if k in self.state})
        restore_rng(tensors, meta["trainer"], self.world, self.device, self.cfg.seed, self.state["global_step"])

    def save_best(self, scores: dict[str, float]) -> None:
        if self.world.is_main:
            # The epoch's number as metrics.jsonl counts (1 = the first), not the 0-based index.
            self.captioner.save(self.out / BEST_DIR, info={"val_scores": scores,
                                                            "epoch": self.state["epoch"] + 1})

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> Path:
        from tqdm import tqdm

        cfg, state = self.cfg, self.state
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(
                {"model": to_dict(self.model_cfg), "data": to_dict(self.data_cfg), "train": to_dict(cfg),
                 "world_size": self.world.size}, indent=2))
        if cfg.resume:
            self.log.resume_at(state["global_step"])
        while state["epoch"] < cfg.epochs and not state["stopped"]:
            epoch, first = state["epoch"], state["step_in_epoch"]
            loader = self.begin_epoch(epoch)
            started, recent = time.time(), []
            bar = tqdm(total=self.data.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
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
                bar.set_postfix(loss=f"{np.mean(recent[-50:]):.3f}" if recent else "-", lr=f"{self.optim.lr:.1e}")
                bar.update(1)
                if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0:
                    # Recorded first: a kill between the two leaves a record past the checkpoint,
                    # which resuming drops and writes again.
                    self.log.record({"step": state["global_step"], "epoch": epoch + (i + 1) / self.data.steps_per_epoch,
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
                      "lr": self.optim.lr, "epoch_seconds": round(train_seconds, 1),
                      "sampling_probability": round(self.sampling_probability(), 4),
                      "unreadable_images": state["unreadable_images"]}
            state.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_loss_steps=0)
            self.log.record(record)
            self.save_last()
            self.log.show_epoch(record, improved)
        self.world.barrier()
        return self.out / BEST_DIR


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
    backbone, CNN weights and preprocessing, hence the same cache keys; with init_from the
    checkpoint's), sharded over the processes under torchrun. Returns {"train" | "val":
    (readable images, images)}."""
    device = parse_device(cfg.device)
    world = init_world(device)
    try:
        device = rank_device(device, world)
        train, val = training_records(data_cfg, cfg)
        start = read_initial_checkpoint(cfg.init_from) if cfg.init_from else None
        name = start.model.backbone if start else model_cfg.backbone
        backbone = build_backbone(name, pretrained=start is None)
        preprocess_cfg = start.preprocess if start else backbone.preprocess
        if start:
            load_module_state(backbone.module, start.tensors, "encoder.", str(start.path))
        backbone.module.to(device)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        cache_module, cache_name, _ = cached_part(backbone.module, name, cfg, preprocess_cfg.image_size)
        counts = {}
        views = [("train", train, False), ("val", val, False)]
        if cfg.flip_augment:
            views.append(("train mirrored", train, True))
        for split, records, flipped in views:
            _, readable = feature_cache(cache_module, cache_name, preprocess_cfg, records,
                                        cache_dir, world, device, cfg.num_workers, flipped=flipped)
            counts[split] = (int(readable.sum()), len(records))
        return counts
    finally:
        world.close()
