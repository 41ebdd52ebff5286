"""Trajectory rows -> tensors a Qwen2.5-VL-like policy takes, for training and scoring.

A trajectory row (see workers/engines) holds the whole chat as ``input_ids`` and every image the
policy was shown as ``images``, in order. The pixels are recomputed here with the checkpoint's
own image processor, so what the trainer sees is what the rollout engine saw; the number of
image tokens each image expands to is checked against ``input_ids`` (a mismatch is verl's
"Image features and image tokens do not match", caught here with the row that causes it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import tir  # noqa: F401  - environment shims before transformers imports torchvision
from tir.agent.models import mm_token_type_ids
from tir.protocol import Batch


class TrajectoryError(ValueError):
    pass


def image_token_counts(processor, image_grid_thw) -> list[int]:
    """How many ``<|image_pad|>`` tokens each image takes (patches / merge_size²)."""
    merge = processor.image_processor.merge_size**2
    return [int(grid.prod()) // merge for grid in image_grid_thw]


def model_inputs(batch: Batch, processor, pad_token_id: int) -> dict:
    """Tensors for ``model(**inputs)``: right-padded ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids`` (transformers 5.19 needs it for the M-RoPE positions of image tokens:
    without it log-probs are silently wrong) and, when rows hold images, ``pixel_values`` and
    ``image_grid_thw`` for every image of every row, in row order."""
    import torch

    input_ids, attention_mask = batch.to_padded("input_ids", pad_value=pad_token_id, dtype=torch.long)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_token_type_ids(processor, input_ids),
    }
    rows = batch.column("images") if "images" in batch.columns else [[] for _ in range(len(batch))]
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    tokens_per_row = ((input_ids == image_token) & (attention_mask == 1)).sum(dim=1).tolist()
    flat = [image for row in rows for image in (row or [])]
    counts = []
    if flat:
        pixels = processor.image_processor(images=[np.asarray(image) for image in flat], return_tensors="pt")
        inputs["pixel_values"] = pixels["pixel_values"]
        inputs["image_grid_thw"] = pixels["image_grid_thw"]
        counts = image_token_counts(processor, pixels["image_grid_thw"])
    _check_image_tokens(rows, counts, tokens_per_row)
    return inputs


def _check_image_tokens(rows: Sequence, counts: list[int], tokens_per_row: list[int]) -> None:
    start = 0
    for index, (row, found) in enumerate(zip(rows, tokens_per_row)):
        shown = len(row or [])
        expected = sum(counts[start : start + shown])
        start += shown
        if found != expected:
            raise TrajectoryError(
                f"row {index}: input_ids hold {found} image tokens but its {shown} image(s) expand to {expected} "
                "with this checkpoint's image processor (were the images resized, dropped or truncated?)"
            )


def assistant_mask(processor, input_ids: Sequence[int]) -> list[int]:
    """1 on the tokens of every assistant turn (its text and closing ``<|im_end|>``, which the
    policy generated), 0 elsewhere: the SFT loss mask of a chat rendered with the Qwen template."""
    tokenizer = processor.tokenizer
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = list(input_ids)
    mask = [0] * len(ids)
    i = 0
    while i <= len(ids) - len(header):
        if ids[i : i + len(header)] != header:
            i += 1
            continue
        i += len(header)
        while i < len(ids):
            mask[i] = 1
            i += 1
            if ids[i - 1] == end:
                break
    return mask
