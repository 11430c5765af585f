"""The vision encoder's cost model: fit from vision_samples.csv, the calibration.yaml ``vision`` section,
and vision_ms(vision_tokens, images).

Per encoder call the cost follows the patches in that call (attention is quadratic in the sequence), so
the fit is per *images per call* I (1 and 2 are swept): ``vision_I(N) = a + b N + c N^2`` over N patches per
image, weighted by 1/y^2 (relative error), with a leave-one-size-out error per I. A request with k images
of N patches costs, as the deployment sends them,

- ``together`` (one call): vision_k(N); for k beyond the largest swept I, the per-image increment of the
  last two fitted I continues linearly (flagged extrapolated);
- ``separate`` (one call per image): k * vision_1(N).

Both fits are stored, so the difference between the two ways is modelled, not averaged away. The
embedding step (token ids + image features -> inputs_embeds) is fitted as a + b S over its sequence S.

Pure numpy: the admission path may import this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trt_latency.errors import CalibrationError, InputError

MODES = ("together", "separate")


@dataclass
class VisionCalibration:
    family: str
    tokens_per_patch: float
    images_per_call: str  # together | separate: how the deployment sends a request's images
    fits: dict[int, list[float]]  # images per call -> [a, b, c] (ms per call over patches per image)
    # I -> loso_median_rel, loso_max_rel, n_sizes, median_se_max (the noisiest size's median, relative SE)
    error: dict[int, dict[str, float]] = field(default_factory=dict)
    patch_range: list[float] = field(default_factory=lambda: [0.0, 0.0])  # patches per image swept [lo, hi]
    embedding: list[float] | None = None  # [a, b] ms over the embedding step's sequence length
    embedding_range: list[float] | None = None
    # The encoder's native grid (ViT-style: config image_size / patch_size squared; 0 = none): there it skips
    # the position-embedding interpolation every other size pays, so its cost is measured, not fitted
    # (the fixture ViT: 1.3 ms at 196 patches, cheaper than 100 patches; the quadratic said 2.6 ms).
    native_patches: float = 0.0
    native_ms: dict[int, float] = field(default_factory=dict)  # images per call -> ms per call at native

    def call_ms(self, patches: float, images: int) -> float:
        if self.native_patches > 0 and patches == self.native_patches and images in self.native_ms:
            return self.native_ms[images]
        return self.fit_ms(patches, images)

    def fit_ms(self, patches: float, images: int) -> float:
        """The fitted quadratic alone (what call_ms says away from the native grid)."""
        a, b, c = self.fits[images]
        return max(a + patches * (b + c * patches), 0.0)

    def vision_ms(self, vision_tokens: float, images: int = 1, together: bool | None = None) -> tuple[float, bool]:
        """(encoder ms for a request's vision tokens over `images` images, extrapolated?)."""
        if vision_tokens <= 0:
            return 0.0, False
        images = max(1, int(images))
        n = vision_tokens / self.tokens_per_patch / images
        lo, hi = self.patch_range
        extrapolated = not lo <= n <= hi
        joint = (self.images_per_call == "together") if together is None else together
        if not joint or images == 1:
            return images * self.call_ms(n, 1), extrapolated
        if images in self.fits:
            return self.call_ms(n, images), extrapolated
        top = max(self.fits)
        below = max((i for i in self.fits if i < top), default=None)
        if below is None:
            return images * self.call_ms(n, top) / top, True
        step = (self.call_ms(n, top) - self.call_ms(n, below)) / (top - below)
        return self.call_ms(n, top) + step * (images - top), True

    def embedding_ms(self, sequence: float) -> float:
        if self.embedding is None:
            return 0.0
        return max(self.embedding[0] + self.embedding[1] * sequence, 0.0)


def _quad(x: np.ndarray, y: np.ndarray, relative: bool = True) -> list[float]:
    """Least squares a + b x + c x^2; relative: residuals weighted 1/y, i.e. the relative error the TTFT
    check measures, so the 1-3 ms sizes count as much as the 100 ms ones (ordinary least squares on ms is
    set by the largest sizes and misses the small ones by 30% or more). Fewer points: lower degree."""
    deg = min(2, len(x) - 1)
    w = 1.0 / np.maximum(y, 1e-9) if relative else None
    coef = np.polyfit(x, y, deg, w=w)[::-1]
    out = [0.0, 0.0, 0.0]
    out[: len(coef)] = [float(v) for v in coef]
    return out


def loso_errors(x: np.ndarray, y: np.ndarray, relative: bool = True) -> np.ndarray:
    """Signed relative error at each size of the fit on the other sizes (leave one size out)."""
    out = np.full(len(x), math.nan)
    for k in range(len(x)):
        keep = np.arange(len(x)) != k
        if keep.sum() < 2:
            continue
        a, b, c = _quad(x[keep], y[keep], relative)
        out[k] = max(a + x[k] * (b + c * x[k]), 0.0) / y[k] - 1.0
    return out


def vision_medians(rows: list[tuple[str, int, int, int, int, float]], images: int,
                   max_visits: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patches per image, median ms, median's relative SE) per swept size of `images` per call; with
    `max_visits`, only each size's first that many samples (about what a fixed-count sweep measured)."""
    from trt_latency.estimator.fit import median_rel_se

    sel = [r for r in rows if r[0] == "vision" and r[1] == images]
    sizes = sorted({r[2] for r in sel})
    per = [[r[5] for r in sel if r[2] == n][:max_visits] for n in sizes]
    se = [median_rel_se(np.zeros(len(v)), np.asarray(v, dtype=float))[0] if v else math.nan for v in per]
    return np.array(sizes, dtype=float), np.array([np.median(v) for v in per]), np.array(se)


def fit_vision(rows: list[tuple[str, int, int, int, int, float]], family: str, tokens_per_patch: float,
               images_per_call: str = "together", max_visits: int | None = None,
               native_patches: float = 0.0) -> VisionCalibration:
    """vision_samples.csv rows -> VisionCalibration (medians per size, then the weighted quadratic; the
    native grid's median kept apart, outside the fit)."""
    if images_per_call not in MODES:
        raise InputError(field="images_per_call", expected=" or ".join(MODES), got=images_per_call)
    fits: dict[int, list[float]] = {}
    error: dict[int, dict[str, float]] = {}
    patches_seen: list[float] = []
    native_ms: dict[int, float] = {}
    for images in sorted({r[1] for r in rows if r[0] == "vision"}):
        x, med, se = vision_medians(rows, images, max_visits)
        patches_seen += x.tolist()
        at = x == native_patches
        if native_patches > 0 and at.any():
            native_ms[images] = float(med[at][0])
            x, med, se = x[~at], med[~at], se[~at]
        if len(x) < 2:
            continue
        fits[images] = _quad(x, med)
        rel = np.abs(loso_errors(x, med))
        rel = rel[np.isfinite(rel)]
        error[images] = {"loso_median_rel": float(np.median(rel)) if rel.size else math.nan,
                         "loso_max_rel": float(np.max(rel)) if rel.size else math.nan, "n_sizes": float(len(x)),
                         "median_se_max": float(np.max(se))}
    if 1 not in fits:
        raise InputError("too few vision samples", field="vision_samples",
                         expected="at least 2 patch counts with 1 image per call", got=len(rows))
    emb = [r for r in rows if r[0] == "embedding"]
    embedding = embedding_range = None
    if emb:
        seqs = sorted({r[3] for r in emb})
        med = np.array([np.median([r[5] for r in emb if r[3] == s]) for s in seqs])
        if len(seqs) >= 2:
            b, a = np.polyfit(np.array(seqs, dtype=float), med, 1)
            embedding = [float(a), float(b)]
        else:
            embedding = [float(med[0]), 0.0]
        embedding_range = [float(seqs[0]), float(seqs[-1])]
    return VisionCalibration(family, float(tokens_per_patch), images_per_call, fits, error,
                             [float(min(patches_seen)), float(max(patches_seen))], embedding, embedding_range,
                             float(native_patches) if native_ms else 0.0, native_ms)


# ------------------------------------------------------------------------------------------ yaml


def vision_to_dict(v: VisionCalibration) -> dict[str, Any]:
    out: dict[str, Any] = {
        "family": v.family,
        "tokens_per_patch": float(v.tokens_per_patch),
        "images_per_call": v.images_per_call,
        "fits": {int(i): [float(x) for x in c] for i, c in sorted(v.fits.items())},
        "error": {int(i): {k: float(x) for k, x in e.items()} for i, e in sorted(v.error.items())},
        "patch_range": [float(x) for x in v.patch_range],
    }
    if v.embedding is not None:
        out["embedding"] = [float(x) for x in v.embedding]
        out["embedding_range"] = [float(x) for x in (v.embedding_range or [0.0, 0.0])]
    if v.native_patches > 0 and v.native_ms:
        out["native"] = {"patches": float(v.native_patches), "ms": {int(i): float(x) for i, x in sorted(v.native_ms.items())}}
    return out


def vision_from_dict(data: Any, path: str | None = None) -> VisionCalibration:
    """The optional ``vision`` section; any problem is a CalibrationError naming the field."""

    def fail(name: str, expected: str, got: Any) -> CalibrationError:
        shown = got if isinstance(got, int | float | str | type(None)) else type(got).__name__
        return CalibrationError(path=path, field=f"vision.{name}" if name else "vision", expected=expected, got=shown)

    def num(x: Any, name: str) -> float:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(float(x)):
            raise fail(name, "a finite number", x)
        return float(x)

    def nums(x: Any, name: str, n: int) -> list[float]:
        if not isinstance(x, list) or len(x) != n:
            raise fail(name, f"{n} numbers", x)
        return [num(v, f"{name}[{i}]") for i, v in enumerate(x)]

    if not isinstance(data, Mapping):
        raise fail("", "a mapping", data)
    for key in ("family", "tokens_per_patch", "images_per_call", "fits", "patch_range"):
        if key not in data:
            raise fail(key, "a value (missing key)", None)
    if not isinstance(data["family"], str):
        raise fail("family", "a string", data["family"])
    tpp = num(data["tokens_per_patch"], "tokens_per_patch")
    if tpp <= 0:
        raise fail("tokens_per_patch", "a number > 0", tpp)
    if data["images_per_call"] not in MODES:
        raise fail("images_per_call", " or ".join(MODES), data["images_per_call"])
    raw = data["fits"]
    if not isinstance(raw, Mapping) or not raw:
        raise fail("fits", "a mapping images per call -> [a, b, c]", raw)
    fits = {}
    for k, c in raw.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise fail("fits", "integer keys >= 1 (images per call)", k)
        fits[k] = nums(c, f"fits.{k}", 3)
    if 1 not in fits:
        raise fail("fits", "a fit for 1 image per call", None)
    err_raw = data.get("error") or {}
    if not isinstance(err_raw, Mapping):
        raise fail("error", "a mapping", err_raw)
    error = {}
    for k, e in err_raw.items():
        if not isinstance(e, Mapping):
            raise fail(f"error.{k}", "a mapping", e)
        error[int(k)] = {str(n): float(x) if isinstance(x, int | float) else math.nan for n, x in e.items()}
    pr = nums(data["patch_range"], "patch_range", 2)
    emb = nums(data["embedding"], "embedding", 2) if data.get("embedding") is not None else None
    er = nums(data["embedding_range"], "embedding_range", 2) if data.get("embedding_range") is not None else None
    native_patches, native_ms = 0.0, {}
    if data.get("native") is not None:  # optional: files without it load as before
        nat = data["native"]
        if not isinstance(nat, Mapping) or not isinstance(nat.get("ms"), Mapping) or not nat["ms"]:
            raise fail("native", "a mapping {patches: N, ms: {images per call: ms}}", nat)
        native_patches = num(nat.get("patches"), "native.patches")
        for k, x in nat["ms"].items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise fail("native.ms", "integer keys >= 1 (images per call)", k)
            native_ms[k] = num(x, f"native.ms.{k}")
            if native_ms[k] < 0:
                raise fail(f"native.ms.{k}", "a number >= 0", x)
        if native_patches <= 0:
            raise fail("native.patches", "a number > 0", native_patches)
    return VisionCalibration(data["family"], tpp, data["images_per_call"], fits, error, pr, emb, er,
                             native_patches, native_ms)
