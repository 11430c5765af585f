"""3-D M-RoPE position ids (temporal, height, width) of Qwen2.5-VL-style text decoders, in numpy.

onnxruntime-genai's builder exports Qwen2.5-VL's text decoder with ``position_ids`` [3, B, S]: text tokens
carry one position repeated on the three rows; an image's tokens carry its merged grid (t, h, w) offset by
the position where the image starts; the text after it continues from the image's largest position + 1,
so a prompt with images ends below its length. Decode steps continue from there: position = KV length +
``delta`` on all three rows, ``delta = max(prompt positions) + 1 - prompt length`` (transformers'
``rope_deltas``).

``get_rope_index`` is transformers' ``Qwen2_5_VLModel.get_rope_index`` (modeling_qwen2_5_vl, 5.x) in numpy,
batch and attention mask included, checked against transformers' own output in tests/test_mrope.py (the
expected arrays made by tools/fixtures/expected_mrope.py). No torch at runtime.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values (transformers' convention)

Grid = tuple[int, int, int]  # (t, h, w) in patches, before the spatial merge


def vision_positions(start: int, grid: Sequence[int], spatial_merge_size: int,
                     time_interval: float = 1.0) -> np.ndarray:
    """[3, t * h/m * w/m] positions of one image / video (transformers' get_vision_position_ids)."""
    t, h, w = (int(grid[0]), int(grid[1]) // spatial_merge_size, int(grid[2]) // spatial_merge_size)
    # torch: int64 arange * python float -> float32, then .long() (truncation); same here
    temporal = (np.arange(t, dtype=np.float32) * np.float32(time_interval)).astype(np.int64)
    tt, hh, ww = np.meshgrid(temporal, np.arange(h) + start, np.arange(w) + start, indexing="ij")
    out = np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64)
    out[0] += start  # after the time interval's multiply, as transformers does
    return out


Segment = tuple[int, Sequence[int] | None, float]  # (text tokens, or 0 and a vision grid; its time interval)


def layout_positions(segments: Sequence[Segment], spatial_merge_size: int) -> np.ndarray:
    """[3, S] positions of a prompt given as segments in order: text runs (one position on the three rows)
    and images / videos (their grid, from where they start); after a vision segment the positions continue
    from its start + max(h, w) / merge (its largest position + 1 for an image), as transformers does."""
    parts: list[np.ndarray] = []
    current = 0
    for count, grid, interval in segments:
        if grid is None:
            parts.append(text_positions(current, count))
            current += count
            continue
        parts.append(vision_positions(current, grid, spatial_merge_size, interval))
        current += max(int(grid[1]), int(grid[2])) // spatial_merge_size
    return np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)


def _groups(types: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal token type: (type, start, end)."""
    if types.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [types.size]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def get_rope_index(mm_token_type_ids: np.ndarray, image_grid_thw: Sequence[Sequence[int]] | None = None,
                   video_grid_thw: Sequence[Sequence[int]] | None = None,
                   second_per_grid_ts: Sequence[float] | None = None, attention_mask: np.ndarray | None = None,
                   spatial_merge_size: int = 2, tokens_per_second: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids [3, B, S] int64, rope deltas [B, 1]) for token types [B, S] (0 text, 1 image, 2 video).

    A run of image (video) tokens is one image (video): the grids are taken in order across the batch.
    Masked tokens (attention_mask 0) get position 0 and do not count."""
    types_all = np.atleast_2d(np.asarray(mm_token_type_ids))
    batch, seq = types_all.shape
    positions = np.zeros((3, batch, seq), dtype=np.int64)
    grids = {IMAGE: iter(image_grid_thw or ()), VIDEO: iter(video_grid_thw or ())}
    seconds = iter(second_per_grid_ts if second_per_grid_ts is not None else [1.0] * seq)
    deltas = []
    for b in range(batch):
        keep = (np.asarray(attention_mask[b]).astype(bool) if attention_mask is not None
                else np.ones(seq, dtype=bool))
        types = types_all[b][keep]
        segments: list[Segment] = []
        for kind, start, end in _groups(types):
            if kind == TEXT:
                segments.append((end - start, None, 1.0))
            else:
                interval = tokens_per_second * float(next(seconds)) if kind == VIDEO else 1.0
                segments.append((0, next(grids[kind]), interval))
        llm = layout_positions(segments, spatial_merge_size)
        positions[:, b, keep] = llm
        deltas.append(int(llm.max()) + 1 - int(types.size) if llm.size else 0)
    return positions, np.asarray(deltas, dtype=np.int64)[:, None]


def image_tokens(grid: Sequence[int], spatial_merge_size: int) -> int:
    """LLM tokens of one image: t * (h / m) * (w / m)."""
    return int(grid[0]) * (int(grid[1]) // spatial_merge_size) * (int(grid[2]) // spatial_merge_size)


def prompt_positions(grids: Sequence[Grid], text_tokens: int, spatial_merge_size: int,
                     text_before: int = 0) -> tuple[np.ndarray, int]:
    """Positions [3, S] and the rope delta of a one-request prompt laid out as a VLM chain sends it:
    ``text_before`` text tokens, the images in order, then ``text_tokens`` text tokens. Two images in a row
    are two grids (a real prompt also has a <|vision_start|> and <|vision_end|> token around each image: a
    few positions more, which do not change what a step costs)."""
    segments: list[Segment] = [(text_before, None, 1.0)]
    segments += [(0, g, 1.0) for g in grids]
    segments.append((text_tokens, None, 1.0))
    pos = layout_positions(segments, spatial_merge_size)
    return pos, int(pos.max()) + 1 - pos.shape[1] if pos.size else 0


def text_positions(start: int, count: int) -> np.ndarray:
    """[3, count] positions of text (or decode) tokens: start .. start + count - 1 on all three rows."""
    return np.broadcast_to(np.arange(start, start + count, dtype=np.int64), (3, count))
