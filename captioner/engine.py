"""The one inference engine: images in, Captions out, for every entry point.

    items (paths, PIL images) -> admission + preprocessing (preprocess.ImageInputs: DataLoader
          workers for long jobs, this thread for a single batch) -> encoder (ONNX Runtime on CPU,
          batches encoding ahead in threads; eager PyTorch otherwise) -> batched decoding
          (PyTorch, one thread) -> Captions in input order, batch by batch as they finish

`Captioner.caption`, `captioner caption` (batch.py), `captioner evaluate`, validation during training
and the web UI all run through CaptionEngine, so a photo gets the same caption from each, whatever
the batch size or a resumed run:
- decoding is fp32 everywhere: int8 dynamic quantization scales activations per batch, so a
  caption would depend on the photos batched with it (and it changed 4-5% of captions);
- the model pads every decoding matrix product to at least api.MIN_DECODE_ROWS rows, because CPU
  GEMM kernels sum in another order for a handful of rows; with that a row's numbers are the same
  whatever else the batch holds (tests/test_engine.py checks batch sizes 1 to all);
- ONNX Runtime's features do not depend on the batch size or its thread count (checked bitwise).
"""
from __future__ import annotations

import collections
import contextlib
import gc
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader

from .config import DecodeConfig, PreprocessConfig
from .fast_encoder import OnnxEncoder, cpu_count
from .preprocess import ImageInputs, ImageLoadError, collate_images

ON_ERROR = ("raise", "skip")
# PyTorch runs the decoder on one thread: its small LSTM steps gain little from more, while
# OpenMP threads contending for the cores with ONNX Runtime and the image workers slow each step
# down many times (on 2 loaded cores beam 3 took 618 ms with 2 threads against 43 ms with 1).
DECODE_THREADS = 1
# Image-reading processes for jobs longer than one batch.
DEFAULT_WORKERS = 4


@dataclass
class ImageBatch:
    indices: list[int]                            # positions in the job of the readable images
    images: torch.Tensor | None                   # (B, 3, S, S), None when none was readable
    errors: list[tuple[int, ImageLoadError]]      # (position, why) for the others


def read_images(items: Sequence, cfg: PreprocessConfig, batch_size: int, workers: int
                ) -> Iterator[ImageBatch]:
    """Admitted and preprocessed images in batches of batch_size positions, in order. With
    workers > 0 and more than one batch, DataLoader processes (one PyTorch thread each) start
    reading at once, before the first batch is asked for; otherwise they are read in this thread."""
    dataset = ImageInputs(items, cfg)
    if workers == 0 or len(items) <= batch_size:
        return (ImageBatch(*collate_images([dataset[i] for i in range(start, min(start + batch_size, len(items)))]))
                for start in range(0, len(items), batch_size))
    # The workers are forked: garbage they inherit must never be collected in them, as a dropped
    # ONNX Runtime session there waits forever for its thread pool's threads (which were not
    # forked). gc.freeze() puts every object of this moment out of the collector's reach.
    gc.freeze()
    try:
        loader = iter(DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                 collate_fn=collate_images, prefetch_factor=2))
    finally:
        gc.unfreeze()
    return (ImageBatch(*batch) for batch in loader)


def encode_ahead(batches: Iterable, encode: Callable, depth: int) -> Iterator:
    """encode(batch) for each batch, in order, with `depth` batches encoding in threads while the
    caller decodes (ONNX Runtime and PyTorch release the GIL while they compute)."""
    with ThreadPoolExecutor(depth, thread_name_prefix="encoder") as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.submit(encode, batch))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextlib.contextmanager
def torch_threads(n: int):
    """PyTorch's intra-op threads for a block (a process-wide setting, so restored after)."""
    previous = torch.get_num_threads()
    if previous != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if previous != n:
            torch.set_num_threads(previous)


def source_name(item) -> str:
    """How an error names an input: its path, or a description of an in-memory image."""
    if isinstance(item, Image.Image):
        return f"<PIL image {item.width}x{item.height}>"
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else repr(item)


class CaptionEngine:
    """Runs a Captioner (api.py) over images. One per Captioner (`Captioner.engine`); read only,
    so requests in several threads may share it."""

    def __init__(self, captioner, workers: int | None = None):
        self.captioner = captioner
        self.workers = min(cpu_count(), DEFAULT_WORKERS) if workers is None else workers
        self._stream_encoder: tuple[object, OnnxEncoder] | None = None

    # -- the stages ---------------------------------------------------------------------------
    def encoder(self, many: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """images (B, 3, S, S) -> features (B, D). ONNX Runtime encodes one batch on all cores for
        a single batch (lowest latency); a long job encodes one batch per core, each on one
        thread (EfficientNet's many small layers keep threads waiting for each other: +15%
        throughput). An eager CNN runs in turn with the decoder, on the process's threads."""
        captioner = self.captioner
        fast = captioner.fast_encoder
        if fast is None:
            return captioner.encode     # on the process's PyTorch threads (all cores by default)
        if not many or not isinstance(fast, OnnxEncoder):
            return captioner.encode
        if self._stream_encoder is None or self._stream_encoder[0] is not fast:
            self._stream_encoder = (fast, OnnxEncoder(fast.path, threads=1))
        return self._stream_encoder[1]

    def caption_batches(self, batches: Iterable[ImageBatch], cfg: DecodeConfig, many: bool = True
                        ) -> Iterator[tuple[ImageBatch, list]]:
        """(batch, its Captions in batch.indices order) for each batch of read images, in order;
        with many=True the next batches encode in threads while one decodes."""
        encode = self.encoder(many)

        def encoded(batch: ImageBatch):
            return batch, (encode(batch.images) if batch.images is not None else None)

        parallel = many and self.captioner.fast_encoder is not None
        stream = encode_ahead(batches, encoded, cpu_count()) if parallel else map(encoded, batches)
        for batch, features in stream:
            with torch_threads(DECODE_THREADS):
                captions = self.captioner.caption_features(features, cfg) if features is not None else []
            yield batch, captions

    # -- the whole job ------------------------------------------------------------------------
    def caption(self, items: Sequence, cfg: DecodeConfig, batch_size: int = 32,
                on_error: str = "raise") -> Iterator:
        """One Caption per item, in input order, yielded batch by batch as they finish.
        on_error="raise": the first image that cannot be captioned raises ImageLoadError naming
        it; "skip": it gets a Caption with .error set (text "") in its place and the rest go on."""
        from .api import Caption

        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)} (got {on_error!r})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        items = list(items)
        many = len(items) > batch_size
        batches = read_images(items, self.captioner.preprocess_cfg, batch_size, self.workers if many else 0)
        for batch, captions in self.caption_batches(batches, cfg, many):
            results = dict(zip(batch.indices, captions))
            for i, error in batch.errors:
                error.source = source_name(items[i])
                if on_error == "raise":
                    raise error
                results[i] = Caption.failed(error)
            for i in sorted(results):
                results[i].image = source_name(items[i])
                yield results[i]
