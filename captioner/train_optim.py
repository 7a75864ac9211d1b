"""Optimisation and its schedule for training: Adam over the decoder (and the CNN when it is
fine-tuned, at its own rate), gradient clipping, mixed precision on CUDA, and the learning rate of
every step as PyTorch schedulers (warm-up, then cosine, step or constant). Their state goes into
and comes back from the training checkpoint exactly, so a resumed run takes the same steps."""
from __future__ import annotations

import math
import warnings
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, SequentialLR

from .config import TrainConfig


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


class Optimisation:
    """One optimiser step from an objective, at the scheduled learning rate."""

    def __init__(self, decoder: nn.Module, cnn: nn.Module, cfg: TrainConfig, device: torch.device,
                 steps_per_epoch: int):
        """cnn: the part of the CNN that trains (all of it, or the top with fine_tune_top)."""
        self.cfg = cfg
        groups = [{"params": list(decoder.parameters()), "lr": cfg.lr, "name": "decoder"}]
        if cfg.fine_tune_cnn or cfg.fine_tune_top:
            groups.append({"params": list(cnn.parameters()), "lr": cfg.cnn_lr, "name": "cnn"})
        self.optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        # The CNN's group gets no gradients before fine-tuning starts, so Adam leaves it alone.
        self.scheduler = lr_scheduler(self.optimizer, cfg, steps_per_epoch)
        self.use_amp = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    @property
    def lr(self) -> float:
        """The decoder's learning rate for the next step."""
        return self.optimizer.param_groups[0]["lr"]

    def step(self, objective: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) for the training checkpoint. safetensors holds tensors only: Adam's
        per-parameter tensors (step, exp_avg, exp_avg_sq) go there, its param_groups, any
        non-tensor state, the scaler's and the scheduler's into the JSON header."""
        optimizer_state = self.optimizer.state_dict()
        optim_json = {"param_groups": optimizer_state["param_groups"], "scalars": {}}
        tensors = {}
        for idx, slots in optimizer_state["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{idx}.{name}"] = value
                else:
                    optim_json["scalars"][f"{idx}.{name}"] = value
        return tensors, {"optimizer": optim_json, "scaler": self.scaler.state_dict() if self.use_amp else {},
                         "scheduler": self.scheduler.state_dict()}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, source: str) -> None:
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
                             f"--fine-tune-cnn or --fine-tune-top): {exc}") from None
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
