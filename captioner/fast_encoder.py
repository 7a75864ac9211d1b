"""Fast CPU inference: the checkpoint's CNN exported to ONNX once and run by ONNX Runtime.

On two CPU cores eager PyTorch runs EfficientNet-Lite0 at a small fraction of ONNX Runtime's speed
(see the README's Benchmarks), and the encoder dominates captioning time. Eager PyTorch stays the
reference: training, CUDA, and every case where the export or onnxruntime is unavailable.

The exported graph is cached as `<cache>/captioner/onnx/<hash>.onnx`, the hash covering the encoder's
class, its weights and the preprocessing (which fixes the input size), so a fine-tuned CNN gets its
own file and a stale one is never used. An export is kept only if ONNX Runtime reproduces the eager
features on a test batch; otherwise the eager encoder is used, with one warning per process.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import atomic_write
from .config import PreprocessConfig, cache_folder, to_dict
from .encoder import encoder_digest

# Bump when the export recipe changes, so files written by an older recipe are not reused.
EXPORT_VERSION = 1
# Largest |ONNX - eager| accepted when an export is checked (features are O(1); fp32 noise ~1e-5).
EXPORT_TOLERANCE = 1e-3

EncodeFn = Callable[[torch.Tensor], torch.Tensor]   # images (B, 3, S, S) -> features (B, D)


class FastEncoderWarning(UserWarning):
    """The fast path is unavailable and the slower eager PyTorch encoder is used."""


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, FastEncoderWarning, stacklevel=3)


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def onnx_cache_dir() -> Path:
    return cache_folder("onnx")


def encoder_fingerprint(encoder: nn.Module, cfg: PreprocessConfig) -> str:
    """Hash of what determines the exported graph: class, weights (and buffers), preprocessing."""
    digest = hashlib.sha256(json.dumps({
        "export": EXPORT_VERSION, "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "preprocess": to_dict(cfg)}, sort_keys=True).encode())
    digest.update(encoder_digest(encoder).encode())
    return digest.hexdigest()[:24]


class OnnxEncoder:
    """An ONNX Runtime session with the encoder's contract: images (B, 3, S, S) -> features (B, D)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_count()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads would otherwise spin, taking the cores from the image workers and the
        # decoder that run beside the encoder (measured: faster pipeline without spinning).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()   # (B, 3, S, S)
        (features,) = self.session.run(None, {self.input_name: array})          # (B, D)
        return torch.from_numpy(features)


def export_onnx(encoder: nn.Module, image_size: int, path: Path) -> None:
    """Export with a dynamic batch dimension; written atomically (a crash leaves no half file).

    The dynamo exporter (torch's default) comes first; the TorchScript exporter is the fallback
    for modules torch.export cannot trace. Both print progress, which must not reach stdout
    (captions may be streaming there as JSON Lines).
    """
    example = torch.zeros(2, 3, image_size, image_size)                        # (2, 3, S, S)
    names = dict(input_names=["images"], output_names=["features"])
    exporters = [
        dict(dynamo=True, external_data=False,
             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)),
        dict(dynamo=False, dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
             opset_version=17),
    ]

    def write(tmp: str) -> None:
        errors = []
        for options in exporters:
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    torch.onnx.export(encoder, (example,), tmp, verbose=False, **names, **options)
                return
            except Exception as exc:  # exporters fail in many ways on unusual modules
                errors.append(f"{'dynamo' if options['dynamo'] else 'torchscript'}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise RuntimeError("; ".join(errors))

    atomic_write(path, write)


def check_export(session: OnnxEncoder, encoder: nn.Module, image_size: int) -> float:
    """Largest |ONNX - eager| on a batch of 3 random images (a batch size the export never saw)."""
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = encoder(images).float()                                     # (3, D)
    return float((session(images) - expected).abs().max())


def load_fast_encoder(encoder: nn.Module, cfg: PreprocessConfig, cache_dir: str | os.PathLike | None = None,
                      threads: int | None = None) -> OnnxEncoder | None:
    """ONNX Runtime session for this encoder (exported on first use), or None with a warning-once
    when the fast path is unavailable: the caller then keeps eager PyTorch."""
    try:
        import onnxruntime  # noqa: F401  (only checking that it is installed)
    except ImportError:
        warn_once("no-ort", "onnxruntime is not installed: the CNN runs in eager PyTorch (slower); "
                            "pip install onnxruntime")
        return None
    path = Path(cache_dir or onnx_cache_dir()) / f"{encoder_fingerprint(encoder, cfg)}.onnx"
    if path.is_file():
        try:
            return OnnxEncoder(path, threads)
        except Exception:  # a corrupt or foreign file in the cache: export again below
            path.unlink(missing_ok=True)
    was_training = encoder.training
    encoder.eval()
    try:
        export_onnx(encoder, cfg.image_size, path)
        session = OnnxEncoder(path, threads)
        error = check_export(session, encoder, cfg.image_size)
    except Exception as exc:  # unusual backbone or exporter bug: eager PyTorch still works
        path.unlink(missing_ok=True)
        warn_once("export", f"could not export the {type(encoder).__name__} encoder to ONNX "
                            f"({exc}); the CNN runs in eager PyTorch (slower)")
        return None
    finally:
        encoder.train(was_training)
    if error > EXPORT_TOLERANCE:
        path.unlink(missing_ok=True)
        warn_once("mismatch", f"the ONNX export of {type(encoder).__name__} differs from PyTorch by "
                              f"{error:.2g}; the CNN runs in eager PyTorch (slower)")
        return None
    return session


def make_encode_fn(encoder: nn.Module, preprocess_cfg: PreprocessConfig,
                   device: str | torch.device = "cpu") -> EncodeFn:
    """images (B, 3, S, S) -> float features (B, D) for a frozen encoder, e.g. the training
    feature cache: ONNX Runtime on CPU when available, otherwise eager PyTorch on `device`."""
    device = torch.device(device)
    fast = load_fast_encoder(encoder, preprocess_cfg) if device.type == "cpu" else None
    if fast is not None:
        return fast
    if device.type == "cpu":
        # A snapshot, like the ONNX export; channels-last weights make eager CPU convolutions
        # ~1.5x faster with features equal to 1e-5.
        encoder = copy.deepcopy(encoder).eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return encoder(images.to(device)).float()                              # (B, D)

    return encode
