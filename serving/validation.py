"""One request-validation layer for the serving loop: the Request shape and its field checks.

Every integer field is checked against ext.layout.TOKEN_MAX, the same limit the kernels apply (one
set of limits: what the controller accepts, Estimator.admit accepts too). The controller is stricter
than admit in two ways only: a budget must be > 0 (admit takes 0) and max_new_tokens is required
(admit takes None, "how many fit"). A malformed request raises Invalid with one line saying which
field and what was expected; the controller turns that into a rejecting Decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from trt_latency.ext.layout import TOKEN_MAX, as_int, as_real


class Request(NamedTuple):
    """One request as the serving loop sees it (a Mapping with these keys works too)."""

    vision_tokens: int
    text_tokens: int
    max_new_tokens: int
    tier_idx: int = 0
    top_k: int = 1
    num_active_blocks: int | None = None
    budget_ms: float | None = None
    images: int = 1  # how many images a VLM request's vision tokens come as (the encoder's cost depends on it)


FIELDS = Request._fields


class Invalid(Exception):
    """A malformed request field (becomes a rejecting Decision, never escapes the controller)."""


def short(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not escape
        text = "<unprintable>"
    return text if len(text) <= 40 else text[:37] + "..."


def count(name: str, value: object, lo: int = 0) -> int:
    """An integer field in [lo, TOKEN_MAX] (plain ints and numpy integers; bool is not one)."""
    x = as_int(value)
    if x is None:
        raise Invalid(f"{name} must be an integer, got {type(value).__name__} {short(value)}")
    if not lo <= x <= TOKEN_MAX:
        raise Invalid(f"{name} must be an integer in [{lo}, {TOKEN_MAX}], got {x!r}")
    return x


def budget(value: object) -> float:
    """budget_ms: a finite number > 0."""
    b = as_real(value)
    if b is None or not (math.isfinite(b) and b > 0):
        raise Invalid(f"budget_ms must be a finite number > 0, got {short(value)}")
    return b


def parse(request: object) -> tuple[int, int, int, int, int, int | None, object, int]:
    """(vision, text, max_new, tier, top_k, blocks or None, raw budget, images) of a Request, a 7- or
    8-tuple (images last, 1 when absent) or a Mapping; raises Invalid. num_active_blocks None or 0 =
    the tier's largest measured config."""
    images: object = 1
    if type(request) is Request:
        v, t, n, tier, k, blocks, raw_budget, images = request  # type: ignore[misc]
    elif isinstance(request, Mapping):
        try:
            v, t, n = request["vision_tokens"], request["text_tokens"], request["max_new_tokens"]
        except KeyError as exc:
            raise Invalid(f"missing field {exc.args[0]!r}") from None
        except Exception as exc:  # noqa: BLE001 - hostile mappings
            raise Invalid(f"unreadable request ({type(exc).__name__})") from None
        try:
            tier = request.get("tier_idx", 0)
            k = request.get("top_k", 1)
            blocks = request.get("num_active_blocks")
            raw_budget = request.get("budget_ms")
            images = request.get("images", 1)
        except Exception as exc:  # noqa: BLE001
            raise Invalid(f"unreadable request ({type(exc).__name__})") from None
    elif isinstance(request, tuple) and len(request) == len(FIELDS):
        v, t, n, tier, k, blocks, raw_budget, images = request
    elif isinstance(request, tuple) and len(request) == len(FIELDS) - 1:  # written before images existed
        v, t, n, tier, k, blocks, raw_budget = request
    else:
        raise Invalid(f"expected a Request or a mapping, got {type(request).__name__}")
    vision = count("vision_tokens", v)
    text = count("text_tokens", t)
    new = count("max_new_tokens", n, lo=1)
    tier_i = count("tier_idx", tier)
    top_k = count("top_k", k)
    blocks_i = None if blocks is None else count("num_active_blocks", blocks)
    images_i = count("images", images, lo=1)
    return vision, text, new, tier_i, top_k, blocks_i or None, raw_budget, images_i
