"""Flags every verb that opens a model shares: how its decoder signature is read and its KV bound."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from trt_latency.cli._args import positive_int
from trt_latency.engines.signature import capped_past  # noqa: F401 - re-exported for the verbs

KV_MODES = ("auto", "concat", "shared")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--kv-mode, --io, --dims, --max-past-len (see engines/signature.py)."""
    group = parser.add_argument_group("decoder signature (a model from another exporter)")
    group.add_argument("--kv-mode", choices=KV_MODES, default="auto",
                       help="KV binding: concat (present = past + S in a second buffer), shared (one preallocated "
                            "buffer per layer bound as past and present, written in place: onnxruntime-genai); "
                            "auto = shared when genai_config.json says past_present_share_buffer, else concat")
    group.add_argument("--io", metavar="NAME=ROLE,...",
                       help="name odd inputs/outputs: ROLE input_ids, inputs_embeds, attention_mask, position_ids, "
                            "logits, past_key.I, past_value.I, present_key.I, present_value.I, past.I, present.I")
    group.add_argument("--dims", metavar="NAME=N,...",
                       help="dims neither shapes nor genai_config.json/config.json give: kv_heads, head_dim, "
                            "hidden, vocab, heads, context_length")
    group.add_argument("--max-past-len", type=positive_int, metavar="N",
                       help="longest KV past to time (default: the model's context length from its config, "
                            "capped by the plan's max_past_len; never past what the model supports)")


@dataclass(frozen=True)
class ModelOptions:
    """The flags above as the library reads them (pipeline.tier_from_onnx; open_runner takes kv_mode, io,
    dims): a verb hands this on, never its argparse Namespace."""

    kv_mode: str = "auto"
    io: str | None = None
    dims: str | None = None
    max_past_len: int | None = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ModelOptions:
        """The flags a verb has (one without them leaves their defaults)."""
        return cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__ if hasattr(args, f)})


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """open_runner keywords from the flags (the ones a verb without them leaves at their defaults)."""
    opts = ModelOptions.from_namespace(args)
    return {"kv_mode": opts.kv_mode, "io": opts.io, "dims": opts.dims}


def backend_choices() -> tuple[str, ...]:
    """--backend choices: "auto" plus the one backend registry's names (engines/backends.py)."""
    from trt_latency.engines.backends import BACKENDS

    return BACKENDS
