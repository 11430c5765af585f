"""model.onnx (or a TensorRT engine's I/O tensors) -> DecoderSignature: which input plays which role.

Users bring decoders from real exporters (onnxruntime-genai's model builder, optimum, torch.onnx), and
a model must be fed the way its runtime feeds it. The signature is read once and used by every verb
that opens a model:

- token input: ``input_ids`` [B, S] int32/int64, or ``inputs_embeds`` [B, S, H] float32/float16/bfloat16;
- ``attention_mask`` [B, past + S] and ``position_ids`` [B, S], each optional (genai has no positions:
  rotary runs inside GroupQueryAttention, which derives seqlens_k from the mask's contents);
- or 3-D M-RoPE ``position_ids`` [3, B, S] (temporal, height, width: genai's Qwen2.5-VL text decoder),
  the ``position_ids_mrope`` role (engines/mrope.py computes what it is fed);
- KV in / out by name: ``past_key_values.{i}.key|value`` -> ``present.{i}.key|value`` (optimum, genai,
  ours), ``past_key.{i}`` / ``past_value.{i}`` -> ``present_key.{i}`` / ``present_value.{i}``, and the
  fused ``past.{i}`` [2, B, H, L, D] -> ``present.{i}`` of older exporters.

Dimensions come from static shapes, else a config beside the model (genai_config.json, config.json),
else the graph (GroupQueryAttention attributes, the embedding table), else a flag (``dims``); every
fact records where it came from in ``sources``. ``io`` renames odd inputs to roles (``--io NAME=ROLE``).
Whatever cannot be placed raises SignatureError: one line naming the model, the inputs found, the role
missing and the flag that fixes it.

A TensorRT runner calls ``signature_from_tensors(path, inputs, outputs)`` with (name, shape, dtype)
tuples from the engine's I/O tensors (shape with -1 for dynamic dims, dtype e.g. "float16" or
str(trt.DataType.HALF)).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_latency.errors import InputError

KV_MODES = ("auto", "concat", "shared")
ROLES = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "position_ids_mrope", "logits",
         "past_key.{i}", "past_value.{i}", "present_key.{i}", "present_value.{i}", "past.{i}", "present.{i}")
DIM_NAMES = ("kv_heads", "head_dim", "hidden", "vocab", "heads", "context_length")

Dim = int | str  # a static size, or a symbolic name ("" when unnamed)
Tensor = tuple[str, Sequence[Dim], str]  # (name, shape, dtype)

# ONNX TensorProto element types -> dtype names (numpy's, plus bfloat16).
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32", 9: "bool",
                2: "uint8", 3: "int8"}
# TensorRT / misc spellings -> dtype names.
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16",
                  "int64": "int64", "int32": "int32", "bool": "bool", "float32": "float32", "float16": "float16",
                  "bfloat16": "bfloat16", "tensor(float)": "float32", "tensor(float16)": "float16",
                  "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32"}
_FLOATS = ("float32", "float16", "bfloat16")
_INTS = ("int32", "int64")

# KV naming schemes: (past pattern, present template per kind, layout). Canonical kinds: key, value, fused.
_KV_SCHEMES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"^past_key_values\.(\d+)\.(key|value)$"), "present.{i}.{kind}", "separate"),
    (re.compile(r"^past_(key|value)\.(\d+)$"), "present_{kind}.{i}", "separate"),
    (re.compile(r"^past\.(\d+)$"), "present.{i}", "fused"),
)
# Other spellings of the present side some exporters use.
_PRESENT_ALTERNATIVES = ("present.{i}.{kind}", "present_key_values.{i}.{kind}", "present_{kind}.{i}")
_ENCODER_INPUTS = ("encoder_hidden_states", "encoder_outputs", "encoder_attention_mask")
_PAGED_INPUTS = ("block_table", "block_tables", "slot_mapping")


class SignatureError(InputError):
    """The model's inputs/outputs do not name a decoder trt-latency can time (or a role is missing)."""


@dataclass(frozen=True)
class KvBinding:
    """One block's KV tensors. Separate layout: key and value; fused: one [2, B, H, L, D] tensor (value None)."""

    past_key: str
    present_key: str
    past_value: str | None = None
    present_value: str | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """(past, present) name pairs of this block."""
        out = [(self.past_key, self.present_key)]
        if self.past_value is not None and self.present_value is not None:
            out.append((self.past_value, self.present_value))
        return out


@dataclass(frozen=True)
class DecoderSignature:
    """What a decode step binds, read once from the model."""

    model: str
    token_input: str  # role: "input_ids" or "inputs_embeds"
    token_name: str  # the model's input name for it
    token_dtype: str
    attention_mask: str | None
    mask_dtype: str | None
    position_ids: str | None
    position_dtype: str | None
    logits: str
    logits_dtype: str
    kv: tuple[KvBinding, ...]
    kv_layout: str  # "separate" or "fused"
    kv_dtype: str
    kv_heads: int
    head_dim: int
    hidden: int  # 0 when unknown and not needed (token-id model)
    vocab: int
    heads: int | None
    max_past_len: int | None  # the model's longest past (context length - 1), None when unknown
    share_buffer: bool  # genai_config.json search.past_present_share_buffer
    attention_ops: tuple[str, ...]  # attention-like op types in the graph (GroupQueryAttention, ...)
    graph_read: bool  # the ops are known (an ONNX graph; a TensorRT engine's I/O list does not say)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sources: dict[str, str] = field(default_factory=dict)
    position_layout: str = "1d"  # "1d": position_ids [B, S]; "mrope": [3, B, S] (t, h, w rows)
    sliding_window: int = 0  # GroupQueryAttention local_window_size of sliding-window layers (0: none)

    @property
    def blocks(self) -> int:
        return len(self.kv)

    @property
    def can_share_buffer(self) -> bool | None:
        """True when the attention writes present into the past buffer (GroupQueryAttention); None if unknown."""
        if not self.graph_read:
            return None
        return "GroupQueryAttention" in self.attention_ops

    def resolve_kv_mode(self, kv_mode: str = "auto") -> str:
        """'auto' -> 'shared' when genai_config.json says past_present_share_buffer, else 'concat'."""
        if kv_mode not in KV_MODES:
            raise SignatureError(field="kv_mode", expected="one of " + ", ".join(KV_MODES), got=kv_mode)
        if kv_mode == "auto":
            return "shared" if self.share_buffer else "concat"
        if kv_mode == "concat" and self.sliding_window > 0:
            raise SignatureError(
                f"kv_mode concat binds a past of exactly past_len tokens, and this graph's sliding-window "
                f"GroupQueryAttention (local_window_size {self.sliding_window}) refuses a KV buffer shorter than "
                f"its window", path=self.model, field="--kv-mode", expected="shared (or auto) for this model",
                got="concat")
        if kv_mode == "shared" and self.can_share_buffer is False:
            raise SignatureError(
                f"kv_mode shared needs an attention op that writes the new token into the past buffer "
                f"(GroupQueryAttention); this graph concatenates past and present "
                f"({', '.join(self.attention_ops) or 'standard ops'})",
                path=self.model, field="--kv-mode", expected="concat (or auto) for this model", got="shared")
        return kv_mode

    def position_shape(self, new_tokens: int, batch: int = 1) -> list[int]:
        """What position_ids is bound as: [B, S], or [3, B, S] for M-RoPE."""
        return [3, batch, new_tokens] if self.position_layout == "mrope" else [batch, new_tokens]

    def kv_shape(self, length: int, batch: int = 1) -> list[int]:
        if self.kv_layout == "fused":
            return [2, batch, self.kv_heads, length, self.head_dim]
        return [batch, self.kv_heads, length, self.head_dim]

    def step_bindings(self, past_len: int, new_tokens: int = 1, kv_mode: str = "concat",
                      max_len: int | None = None) -> list[dict[str, Any]]:
        """What one step at ``past_len`` binds: [{name, io, role, shape, dtype}], inputs then outputs."""
        mode = self.resolve_kv_mode(kv_mode)
        total = past_len + new_tokens
        cap = max_len if max_len is not None else total
        rows: list[dict[str, Any]] = []

        def add(name: str, io: str, role: str, shape: list[int], dtype: str) -> None:
            rows.append({"name": name, "io": io, "role": role, "shape": shape, "dtype": dtype})

        tok_shape = [1, new_tokens] if self.token_input == "input_ids" else [1, new_tokens, self.hidden]
        add(self.token_name, "input", self.token_input, tok_shape, self.token_dtype)
        if self.attention_mask:
            add(self.attention_mask, "input", "attention_mask", [1, total], self.mask_dtype or "int64")
        if self.position_ids:
            add(self.position_ids, "input", "position_ids_mrope" if self.position_layout == "mrope" else "position_ids",
                self.position_shape(new_tokens), self.position_dtype or "int64")
        past_shape = self.kv_shape(cap if mode == "shared" else past_len)
        present_shape = self.kv_shape(cap if mode == "shared" else total)
        kinds = ("",) if self.kv_layout == "fused" else ("_key", "_value")
        for i, kv in enumerate(self.kv):
            for (past, _), kind in zip(kv.pairs(), kinds, strict=True):
                add(past, "input", f"past{kind}.{i}", past_shape, self.kv_dtype)
        add(self.logits, "output", "logits", [1, new_tokens, self.vocab], self.logits_dtype)
        for i, kv in enumerate(self.kv):
            for (_, present), kind in zip(kv.pairs(), kinds, strict=True):
                add(present, "output", f"present{kind}.{i}" + (" (same buffer as past)" if mode == "shared" else ""),
                    present_shape, self.kv_dtype)
        return rows

    def describe(self, kv_mode: str = "auto") -> dict[str, Any]:
        """The JSON `inspect --json` prints (stable keys)."""
        return {
            "model": self.model,
            "token_input": self.token_input,
            "token_name": self.token_name,
            "token_dtype": self.token_dtype,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "position_layout": self.position_layout,
            "logits": self.logits,
            "kv_mode": self.resolve_kv_mode(kv_mode),
            "kv_layout": self.kv_layout,
            "blocks": self.blocks,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "kv_dtype": self.kv_dtype,
            "hidden": self.hidden or None,
            "vocab": self.vocab,
            "max_past_len": self.max_past_len,
            "share_buffer": self.share_buffer,
            "attention_ops": list(self.attention_ops),
            "kv_inputs": [p for kv in self.kv for p, _ in kv.pairs()],
            "kv_outputs": [q for kv in self.kv for _, q in kv.pairs()],
            "sources": dict(self.sources),
        }


# ------------------------------------------------------------------------------------------ parsing


def parse_io(text: str | None) -> dict[str, str]:
    """'NAME=ROLE,NAME=ROLE' -> {NAME: ROLE}; a ROLE with {i} is e.g. past_key.0 (the block index filled in)."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, role = part.partition("=")
        name, role = name.strip(), role.strip()
        generic = re.sub(r"\.\d+$", ".{i}", role)
        if not sep or not name or generic not in ROLES:
            raise SignatureError(field="--io", expected="NAME=ROLE pairs, ROLE one of " + ", ".join(ROLES)
                                 + " (with the block index for {i})", got=part)
        out[name] = role
    return out


def parse_dims(text: str | None) -> dict[str, int]:
    """'kv_heads=4,head_dim=16' -> {kv_heads: 4, head_dim: 16} (--dims, for what neither shapes nor configs say)."""
    if not text:
        return {}
    out: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            number = int(value)
        except ValueError:
            number = 0
        if not sep or name.strip() not in DIM_NAMES or number <= 0:
            raise SignatureError(field="--dims", expected="NAME=INT pairs, NAME one of " + ", ".join(DIM_NAMES),
                                 got=part.strip())
        out[name.strip()] = number
    return out


def normalize_dtype(dtype: object) -> str:
    """'DataType.HALF', 'tensor(float16)', np.float16, 10 (ONNX elem type) -> 'float16'."""
    if isinstance(dtype, int):
        return _ONNX_DTYPES.get(dtype, f"onnx:{dtype}")
    text = str(getattr(dtype, "__name__", dtype)).lower()
    text = text.removeprefix("datatype.").removeprefix("<class 'numpy.").rstrip("'>")
    return _DTYPE_ALIASES.get(text, text)


# ------------------------------------------------------------------------------------------ configs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def config_facts(model_dir: Path) -> tuple[dict[str, tuple[int, str]], bool | None]:
    """Dims from genai_config.json / config.json beside the model: {dim: (value, source)}, share_buffer."""
    facts: dict[str, tuple[int, str]] = {}
    share: bool | None = None
    genai = model_dir / "genai_config.json"
    if genai.is_file():
        cfg = _read_json(genai)
        model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
        dec = model.get("decoder", {}) if isinstance(model.get("decoder"), dict) else {}
        src = "genai_config.json"
        for dim, key, where in (("kv_heads", "num_key_value_heads", dec), ("head_dim", "head_size", dec),
                                ("hidden", "hidden_size", dec), ("heads", "num_attention_heads", dec),
                                ("vocab", "vocab_size", model), ("context_length", "context_length", model)):
            value = where.get(key)
            if isinstance(value, int) and value > 0:
                facts.setdefault(dim, (value, f"{src} {key}"))
        search = cfg.get("search", {}) if isinstance(cfg.get("search"), dict) else {}
        max_length = search.get("max_length")
        if isinstance(max_length, int) and max_length > 0:
            facts.setdefault("context_length", (max_length, f"{src} search.max_length"))
        if "past_present_share_buffer" in search:
            share = bool(search["past_present_share_buffer"])
    hf = model_dir / "config.json"
    if hf.is_file():
        cfg = _read_json(hf)
        cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        src = "config.json"
        heads = cfg.get("num_attention_heads", cfg.get("n_head"))
        # HF names first, then GPT-2 style ones (n_head, n_embd, n_positions).
        for dim, key in (("kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"), ("hidden", "hidden_size"),
                         ("hidden", "n_embd"), ("heads", "num_attention_heads"), ("heads", "n_head"),
                         ("vocab", "vocab_size"), ("context_length", "max_position_embeddings"),
                         ("context_length", "n_positions")):
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                facts.setdefault(dim, (value, f"{src} {key}"))
        if isinstance(heads, int) and heads > 0:
            facts.setdefault("kv_heads", (heads, "config.json num_attention_heads (no num_key_value_heads)"))
            hidden = cfg.get("hidden_size", cfg.get("n_embd"))
            if isinstance(hidden, int) and hidden % heads == 0:
                facts.setdefault("head_dim", (hidden // heads, "config.json hidden_size / num_attention_heads"))
    return facts, share


def graph_facts(model: Any) -> tuple[dict[str, tuple[int, str]], tuple[str, ...]]:
    """Dims from the graph itself: GroupQueryAttention attributes, the embedding table; attention op types."""
    facts: dict[str, tuple[int, str]] = {}
    ops: set[str] = set()
    graph = model.graph
    init_shapes = {t.name: list(t.dims) for t in graph.initializer}
    nodes = _all_nodes(graph)
    producer = {out: node for node in nodes for out in node.output}
    for node in nodes:
        if node.op_type in ("GroupQueryAttention", "MultiHeadAttention", "Attention", "PagedAttention",
                            "SparseAttention", "PackedMultiHeadAttention"):
            ops.add(node.op_type)
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: a.i for a in node.attribute if a.type == 2}  # AttributeProto.INT
            if attrs.get("local_window_size", -1) > 0:  # sliding-window layers (Gemma 3, Mistral)
                facts.setdefault("sliding_window", (attrs["local_window_size"],
                                                    "graph GroupQueryAttention local_window_size"))
            if attrs.get("kv_num_heads", 0) > 0:
                facts.setdefault("kv_heads", (attrs["kv_num_heads"], "graph GroupQueryAttention kv_num_heads"))
            if attrs.get("num_heads", 0) > 0:
                facts.setdefault("heads", (attrs["num_heads"], "graph GroupQueryAttention num_heads"))
                # head size = query width / num_heads (packed QKV: / (num_heads + 2 kv_num_heads))
                width = _projection_width(node.input[0], producer, init_shapes)
                packed = len(node.input) < 2 or not node.input[1]
                groups = attrs["num_heads"] + (2 * attrs.get("kv_num_heads", 0) if packed else 0)
                if width and groups and width % groups == 0:
                    facts.setdefault("head_dim", (width // groups, "graph GroupQueryAttention query width / "
                                                  + ("(num_heads + 2 kv_num_heads)" if packed else "num_heads")))
        if node.op_type == "Gather" and node.input and node.input[0] in init_shapes:
            shape = init_shapes[node.input[0]]
            if len(shape) == 2 and ("input_ids" in node.input[1:] or "embed" in node.input[0].lower()):
                facts.setdefault("vocab", (int(shape[0]), f"graph embedding table {node.input[0]}"))
                facts.setdefault("hidden", (int(shape[1]), f"graph embedding table {node.input[0]}"))
    return facts, tuple(sorted(ops))


def _projection_width(name: str, producer: Mapping[str, Any], init_shapes: Mapping[str, list[int]]) -> int | None:
    """Output width of the projection that makes tensor ``name``: MatMul by an initializer [K, N], or
    MatMulNBits (attribute N), looking through a bias Add / Reshape / Cast."""
    for _ in range(4):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "MatMulNBits":
            return next((a.i for a in node.attribute if a.name == "N"), None)
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in init_shapes:
            shape = init_shapes[node.input[1]]
            return int(shape[-1]) if len(shape) == 2 else None
        if node.op_type not in ("Add", "Cast", "Reshape"):
            return None
        name = node.input[0]
    return None


def _all_nodes(graph: Any) -> list[Any]:
    """Nodes of the graph and of its subgraphs (If / Loop bodies)."""
    out = []
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            out.append(node)
            for attr in node.attribute:
                if attr.type == 5:  # GRAPH
                    stack.append(attr.g)
                elif attr.type == 10:  # GRAPHS
                    stack.extend(attr.graphs)
    return out


# ------------------------------------------------------------------------------------------ detection


def _dims_of(shape: Sequence[Dim]) -> list[int | None]:
    """Static dims as ints, symbolic / dynamic as None."""
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def _canonical_kv_role(role: str) -> str | None:
    """An --io KV role -> the canonical name detection understands."""
    m = re.match(r"^(past|present)_(key|value)\.(\d+)$", role)
    if m:
        side, kind, i = m.groups()
        return f"past_key_values.{i}.{kind}" if side == "past" else f"present.{i}.{kind}"
    m = re.match(r"^(past|present)\.(\d+)$", role)
    if m:
        return role
    return None


def signature_from_tensors(model: str | os.PathLike[str], inputs: Sequence[Tensor], outputs: Sequence[Tensor], *,
                           model_dir: str | os.PathLike[str] | None = None, io: Mapping[str, str] | None = None,
                           dims: Mapping[str, int] | None = None, graph: Any = None,
                           metadata: Mapping[str, Any] | None = None) -> DecoderSignature:
    """The signature from I/O tensor lists (ONNX graph inputs, or a TensorRT engine's I/O tensors).

    ``model_dir``: where genai_config.json / config.json are looked for (default: the model's folder).
    ``io``: {model name: role} overrides; ``dims``: {kv_heads|head_dim|hidden|vocab|heads|context_length: int}
    for what neither shapes nor configs say; ``graph``: the onnx ModelProto (for graph facts);
    ``metadata``: trt_latency's own model metadata (our exported decoders carry their dims).
    """
    spath = os.fspath(model)
    folder = Path(model_dir) if model_dir is not None else Path(spath).parent
    io = dict(io or {})
    names_in = [t[0] for t in inputs]
    found = ",".join(names_in)
    # Apply --io: canonical name -> the model's actual name.
    rename: dict[str, str] = {}
    for name, role in io.items():
        if name not in names_in and name not in [t[0] for t in outputs]:
            raise SignatureError(f"--io names '{name}', which the model does not have (inputs {found})",
                                 path=spath, field="--io", expected="an input or output name of the model", got=name)
        canon = _canonical_kv_role(role) or role
        rename[name] = canon
    ins = {rename.get(n, n): (n, list(s), normalize_dtype(d)) for n, s, d in inputs}
    outs = {rename.get(n, n): (n, list(s), normalize_dtype(d)) for n, s, d in outputs}

    def fail(role: str, why: str, fix: str) -> SignatureError:
        return SignatureError(f"cannot time this decoder: {why}; inputs found: {found}; fix: {fix}",
                              path=spath, field=role)

    for name in _ENCODER_INPUTS:
        if name in ins:
            raise fail("encoder_hidden_states", f"input '{name}' makes it an encoder-decoder (its decoder "
                       "needs the encoder's output each step), not a decoder-only model",
                       "export the decoder-only model (or time the decoder with a fixed encoder output outside "
                       "trt-latency)")
    for name in _PAGED_INPUTS:
        if name in ins:
            raise fail("block_table", f"input '{name}' is a paged-attention KV cache (blocks indexed by a "
                       "table), which trt-latency does not bind", "build the model without paged attention "
                       "(e.g. the genai builder without block tables) so KV is past_key_values.{i}.key|value")

    # Token input.
    if "input_ids" in ins and "inputs_embeds" in ins:
        raise fail("input_ids", "both input_ids and inputs_embeds are inputs", "--io NAME=input_ids for the one to feed")
    if "input_ids" in ins:
        token_role = "input_ids"
    elif "inputs_embeds" in ins:
        token_role = "inputs_embeds"
    else:
        raise fail("input_ids", "no token input (input_ids [B,S] or inputs_embeds [B,S,H])",
                   "--io NAME=input_ids or --io NAME=inputs_embeds")
    token_name, token_shape, token_dtype = ins[token_role]
    want = _INTS if token_role == "input_ids" else _FLOATS
    if token_dtype not in want:
        raise fail(token_role, f"'{token_name}' is {token_dtype}, expected one of {', '.join(want)}",
                   "--io NAME=input_ids (ids) or NAME=inputs_embeds (embeddings) on the right input")

    # KV pairs.
    blocks: dict[int, dict[str, str]] = {}
    layouts: set[str] = set()
    for canon in ins:
        for pattern, _, layout in _KV_SCHEMES:
            m = pattern.match(canon)
            if not m:
                continue
            if layout == "fused":
                i, kind = int(m.group(1)), "fused"
            elif pattern.pattern.startswith("^past_key_values"):
                i, kind = int(m.group(1)), m.group(2)
            else:
                kind, i = m.group(1), int(m.group(2))
            blocks.setdefault(i, {})[kind] = canon
            layouts.add(layout)
            break
    if not blocks:
        raise fail("past_key_values", "no KV-cache inputs (past_key_values.{i}.key|value, past_key.{i}, past.{i}): "
                   "a model without explicit KV recomputes the whole prefix each step, so there is no per-position "
                   "decode step to time", "export with past KV (optimum: --task text-generation-with-past) or "
                   "--io NAME=past_key.0,NAME=past_value.0,... for odd names")
    if len(layouts) > 1:
        raise fail("past_key_values", "KV inputs mix the fused past.{i} and separate key/value layouts",
                   "--io to name one layout")
    layout = layouts.pop()
    if sorted(blocks) != list(range(len(blocks))):
        raise fail("past_key_values", f"KV block indices {sorted(blocks)} are not 0..{len(blocks) - 1}",
                   "--io NAME=past_key.{i} for the misnamed ones")
    kv: list[KvBinding] = []
    for i in range(len(blocks)):
        kinds = blocks[i]
        if layout == "fused":
            present = _find_present(outs, i, "fused")
            if present is None:
                raise fail(f"present.{i}", f"no output for block {i}'s KV (expected present.{i})",
                           f"--io NAME=present.{i}")
            kv.append(KvBinding(ins[kinds["fused"]][0], outs[present][0]))
            continue
        for kind in ("key", "value"):
            if kind not in kinds:
                raise fail(f"past_{kind}.{i}", f"block {i} has no past {kind} input", f"--io NAME=past_{kind}.{i}")
        pk, pv = _find_present(outs, i, "key"), _find_present(outs, i, "value")
        if pk is None or pv is None:
            kind = "key" if pk is None else "value"
            raise fail(f"present_{kind}.{i}", f"no present {kind} output for block {i} (expected present.{i}.{kind}"
                       f" or present_{kind}.{i})", f"--io NAME=present_{kind}.{i}")
        kv.append(KvBinding(ins[kinds["key"]][0], outs[pk][0], ins[kinds["value"]][0], outs[pv][0]))
    past0_name = kv[0].past_key
    past0 = next(t for t in ins.values() if t[0] == past0_name)
    kv_dtype = past0[2]
    if kv_dtype not in _FLOATS:
        raise fail("past_key_values", f"KV input '{past0_name}' is {kv_dtype}, expected a float type",
                   "--io to name the float KV inputs")
    kv_dims = _dims_of(past0[1])
    expected_rank = 5 if layout == "fused" else 4
    if len(kv_dims) != expected_rank:
        raise fail("past_key_values", f"KV input '{past0_name}' has rank {len(kv_dims)}, expected {expected_rank} "
                   "([B, kv_heads, L, head_dim]" + (", fused [2, B, H, L, D]" if layout == "fused" else "") + ")",
                   "--io on the right KV tensors")
    off = 1 if layout == "fused" else 0

    # Outputs: logits.
    if "logits" not in outs:
        raise fail("logits", f"no 'logits' output (outputs {','.join(o[0] for o in outputs)})", "--io NAME=logits")
    logits_name, logits_shape, logits_dtype = outs["logits"]

    # Dimensions: shapes, then our metadata, then configs beside the model, then the graph, then --dims.
    sources: dict[str, str] = {}
    cfg, share = config_facts(folder)
    gfacts, attention_ops = graph_facts(graph) if graph is not None else ({}, ())
    meta = dict(metadata or {})
    flag = dict(dims or {})

    def pick(dim: str, static: int | None, static_src: str) -> int | None:
        if dim in flag:  # an explicit flag wins: the user knows better than a config
            sources[dim] = "--dims"
            return int(flag[dim])
        if static is not None:
            sources[dim] = static_src
            return static
        if dim in meta and isinstance(meta[dim], int):
            sources[dim] = "trt_latency metadata"
            return int(meta[dim])
        for facts in (cfg, gfacts):
            if dim in facts:
                value, src = facts[dim]
                sources[dim] = src
                return value
        return None

    kv_heads = pick("kv_heads", kv_dims[off + 1], f"shape of {past0_name}")
    head_dim = pick("head_dim", kv_dims[off + 3], f"shape of {past0_name}")
    heads = pick("heads", None, "")
    tok_dims = _dims_of(token_shape)
    hidden = pick("hidden", tok_dims[2] if token_role == "inputs_embeds" and len(tok_dims) == 3 else None,
                  f"shape of {token_name}")
    lg = _dims_of(logits_shape)
    vocab = pick("vocab", lg[-1] if lg else None, f"shape of {logits_name}")
    context = pick("context_length", None, "")
    meta_past = meta.get("max_past_len")
    if isinstance(meta_past, int) and meta_past > 0 and "context_length" not in flag:
        max_past: int | None = meta_past
        sources["max_past_len"] = "trt_latency metadata"
    elif context is not None:
        # A decode step at past L writes position L: the longest past the model supports is context - 1.
        max_past = context - 1
        sources["max_past_len"] = f"{sources.pop('context_length')} - 1"
    else:
        max_past = None
        sources["max_past_len"] = "unknown: the plan's max_past_len is used; --max-past-len sets it"
    sources.pop("context_length", None)
    for dim, value in (("kv_heads", kv_heads), ("head_dim", head_dim), ("vocab", vocab)):
        if value is None:
            raise fail(dim, f"{dim} is not in the model's shapes, a genai_config.json / config.json beside it, "
                       "or the graph", f"--dims {dim}=N")
    if token_role == "inputs_embeds" and hidden is None:
        raise fail("hidden", f"hidden size of '{token_name}' is not static and no config names it",
                   "--dims hidden=N")
    sources.setdefault("token_input", f"input '{token_name}' ({token_dtype})")
    sources["blocks"] = f"{len(kv)} KV input {'tensors' if layout == 'fused' else 'pairs'} ({layout} layout)"
    sources["kv_dtype"] = f"dtype of {past0_name}"
    if share is not None:
        sources["share_buffer"] = "genai_config.json search.past_present_share_buffer"
    for name, role in io.items():
        sources[f"io:{name}"] = f"--io {name}={role}"
    assert kv_heads is not None and head_dim is not None and vocab is not None  # for mypy: checked above

    mask = ins.get("attention_mask")
    if "position_ids" in ins and "position_ids_mrope" in ins:
        raise fail("position_ids", "two position inputs (position_ids and one named position_ids_mrope)",
                   "--io NAME=ROLE on one of them only")
    pos = ins.get("position_ids_mrope", ins.get("position_ids"))
    pos_layout = _position_layout(pos, "position_ids_mrope" in ins, fail)
    if pos is not None and pos_layout == "mrope":
        sources["position_layout"] = f"M-RoPE: {pos[0]} {list(pos[1])} (t, h, w rows)"
    window = gfacts.get("sliding_window", (0, ""))[0]
    if window:
        sources["sliding_window"] = gfacts["sliding_window"][1]
    known = {token_name, *(m[0] for m in (mask, pos) if m)} | {p for b in kv for p, _ in b.pairs()}
    extra = [n for n in names_in if n not in known]
    if extra:
        raise fail(extra[0], f"input '{extra[0]}' has no role trt-latency knows how to feed",
                   f"--io {extra[0]}=ROLE (ROLE one of {', '.join(ROLES)})")
    for role, t in (("attention_mask", mask), ("position_ids", pos)):
        if t is not None and t[2] not in _INTS:
            raise fail(role, f"'{t[0]}' is {t[2]}, expected int32 or int64", f"--io on the right {role} input")
    return DecoderSignature(
        model=spath, token_input=token_role, token_name=token_name, token_dtype=token_dtype,
        attention_mask=mask[0] if mask else None, mask_dtype=mask[2] if mask else None,
        position_ids=pos[0] if pos else None, position_dtype=pos[2] if pos else None,
        logits=logits_name, logits_dtype=logits_dtype, kv=tuple(kv), kv_layout=layout, kv_dtype=kv_dtype,
        kv_heads=kv_heads, head_dim=head_dim, hidden=hidden or 0, vocab=vocab, heads=heads, max_past_len=max_past,
        share_buffer=bool(share), attention_ops=attention_ops, graph_read=graph is not None, inputs=tuple(names_in),
        outputs=tuple(o[0] for o in outputs), sources=sources, position_layout=pos_layout,
        sliding_window=window)


def _position_layout(pos: tuple[str, list[Dim], str] | None, named_mrope: bool, fail: Any) -> str:
    """'1d' for position_ids [B, S]; 'mrope' for [3, B, S] (a static leading 3, or --io NAME=position_ids_mrope)."""
    if pos is None:
        return "1d"
    name, shape, _ = pos
    dims = _dims_of(shape)
    if len(dims) == 3 and (dims[0] == 3 or (named_mrope and dims[0] is None)):
        return "mrope"
    if len(dims) == 2 and not named_mrope:
        return "1d"
    want = "[3, B, S] (M-RoPE)" if named_mrope else "[B, S], or [3, B, S] for 3-D M-RoPE (t, h, w)"
    raise fail("position_ids", f"'{name}' has shape {list(shape)}, expected {want}",
                "--io NAME=position_ids_mrope for a [3, B, S] input with a symbolic leading dim")


def _find_present(outs: Mapping[str, tuple[str, list[Dim], str]], i: int, kind: str) -> str | None:
    if kind == "fused":
        return f"present.{i}" if f"present.{i}" in outs else None
    for template in _PRESENT_ALTERNATIVES:
        name = template.format(i=i, kind=kind)
        if name in outs:
            return name
    return None


def _onnx_tensors(values: Any) -> list[Tensor]:
    out: list[Tensor] = []
    for v in values:
        tt = v.type.tensor_type
        shape: list[Dim] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        out.append((v.name, shape, normalize_dtype(int(tt.elem_type))))
    return out


def read_signature(path: str | os.PathLike[str], *, io: Mapping[str, str] | str | None = None,
                   dims: Mapping[str, int] | str | None = None) -> DecoderSignature:
    """The signature of an ONNX decoder (weights are not loaded: external data stays on disk)."""
    import onnx

    spath = os.fspath(path)
    if not Path(spath).is_file():
        raise SignatureError("file not found", path=spath, expected="an ONNX model (a decoder)")
    try:
        model = onnx.load(spath, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a bad file
        raise SignatureError(f"not a readable ONNX model ({type(exc).__name__})", path=spath) from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [t for t in _onnx_tensors(model.graph.input) if t[0] not in initializers]
    from trt_latency.engines.export import METADATA_PREFIX

    meta: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            value = prop.value
            meta[prop.key[len(METADATA_PREFIX):]] = int(value) if value.lstrip("-").isdigit() else value
    return signature_from_tensors(spath, inputs, _onnx_tensors(model.graph.output),
                                  io=parse_io(io) if isinstance(io, str) or io is None else io,
                                  dims=parse_dims(dims) if isinstance(dims, str) or dims is None else dims,
                                  graph=model, metadata=meta)


def capped_past(plan_max: int, model_max: int | None, flag: int | None) -> int:
    """The longest past to time: --max-past-len, else the plan's; never beyond the model's own limit."""
    wanted = flag if flag is not None else plan_max
    return min(wanted, model_max) if model_max is not None else wanted

