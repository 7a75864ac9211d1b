"""Validation during training: greedy captions of the validation images, each rank captioning
its share, scored on rank 0 (BLEU-4, CIDEr) once all captions are gathered; every rank gets the
scores. With the CNN frozen the cached features are captioned; once it is fine-tuned the images
are encoded again."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .api import Captioner
from .config import DecodeConfig
from .datasets import ImageCaptions
from .distributed import World
from .evaluate import caption_records, score_captions

VALIDATION_DECODE = DecodeConfig(method="greedy", max_len=20)


@torch.inference_mode()
def validation_scores(captioner: Captioner, records: list[ImageCaptions], features: np.ndarray,
                      usable: np.ndarray, world: World, uses_images: bool, num_workers: int) -> dict[str, float]:
    captioner.eval()
    mine = range(world.rank, len(records), world.size)
    if uses_images:
        # The CNN has changed since the cache was made: encode the images again.
        captions = caption_records(captioner, [records[i] for i in mine], VALIDATION_DECODE,
                                   num_workers=num_workers, progress=False)
    else:
        rows = [i for i in mine if usable[i]]
        captions = {}
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            chunk_features = torch.from_numpy(np.asarray(features[chunk], dtype=np.float32))   # (n, D)
            for i, cap in zip(chunk, captioner.caption_features(chunk_features.to(captioner.device),
                                                                 VALIDATION_DECODE)):
                captions[records[i].image_id] = cap.text
    if world.size > 1:
        gathered = [None] * world.size
        dist.all_gather_object(gathered, captions)
        captions = {k: v for part in gathered for k, v in part.items()}
    scores = {}
    if world.is_main and captions:
        refs = {r.image_id: r.captions for r in records if r.image_id in captions}
        scores = score_captions(refs, captions, metrics=("BLEU-4", "CIDEr"))
    if world.size > 1:
        box = [scores]
        dist.broadcast_object_list(box, src=0)
        scores = box[0]
    return scores
