"""The replay through onnxruntime-genai's own loop (``calibrate --runtime genai``).

A model that ships with its runtime's config (``genai_config.json`` beside it) is served by
onnxruntime-genai's ``Generator``, not by our IOBinding loop. What that loop adds to the engine (the
per-step overhead o, the first step after a prefill c(P), the TTFT side o_p) is the runtime's, so the
replay that fits those terms runs each request through the same calls a genai server makes:

    params = og.GeneratorParams(model); params.set_search_options(max_length=P + n, min_length=P + n)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)               # the prefill (genai runs the model here)
    gen.generate_next_token(); gen.get_next_tokens()   # token 1 (sampled from the prefill's logits)
    ... n - 1 more generate_next_token()    # each runs one decode step, then samples

TTFT = append_tokens + the first generate_next_token; each later call is one decode step as genai pays
it (the first of them also frees the prefill's P x vocab logits: docs/decisions.md). Creating the
Generator (it allocates the KV cache up to max_length) is outside the timed region, as our loop's
buffers are. min_length = max_length keeps a random-weight model from stopping at an end-of-sequence
token. Threads come from a config overlay (session_options.intra_op_num_threads), as a genai user sets
them. ``GenaiLoop`` has the replay's runner surface (``random_prompt``, ``generate``, backend, device), so
``engines.replay.run_replay`` writes its rows through the same RequestSink as the ORT replay.

onnxruntime-genai is imported lazily and is never a dependency: it brings its own onnxruntime, which may
differ from the ``onnxruntime`` module the sweep times (``ort_mismatch`` says so).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trt_latency.engines.base import Closing, GenerateResult, draw_prompt
from trt_latency.errors import BackendUnavailable, InputError

RUNTIMES = ("auto", "ort", "genai")
GENAI_CONFIG = "genai_config.json"
_ORT_LIB = re.compile(r"libonnxruntime\.so\.(\d+\.\d+\.\d+)$")


@dataclass(frozen=True)
class LoopChoice:
    """Which loop replays the requests: ``genai`` (onnxruntime-genai's Generator) or ``ort`` (ours)."""

    kind: str  # "genai" | "ort"
    model_dir: Path
    why: str  # one line for the summary

    @property
    def is_genai(self) -> bool:
        return self.kind == "genai"


def genai_version() -> str | None:
    """onnxruntime-genai's version, or None when it does not import."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    return str(getattr(og, "__version__", "unknown"))


def choose_loop(runtime: str, model_path: str | os.PathLike[str], backend: str = "ort-cpu",
                embeddings: bool = False) -> LoopChoice:
    """``auto``: genai when the model's folder has genai_config.json, onnxruntime_genai imports, the
    backend is ONNX Runtime on CPU and the requests are token ids (not a VLM chain's embeddings); the
    plain ORT loop otherwise. ``genai``: that or BackendUnavailable saying what is missing. ``ort``: always
    our loop."""
    if runtime not in RUNTIMES:
        raise InputError(field="--runtime", expected=" or ".join(RUNTIMES), got=runtime)
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    if runtime == "ort":
        return LoopChoice("ort", folder, "--runtime ort")
    missing = []
    if not (folder / GENAI_CONFIG).is_file():
        missing.append(f"no {GENAI_CONFIG} in {folder}")
    version = genai_version()
    if version is None:
        missing.append("onnxruntime_genai does not import (pip install onnxruntime-genai)")
    if backend != "ort-cpu":
        missing.append(f"backend {backend} (the genai loop runs ONNX Runtime's CPU provider only)")
    if embeddings:
        missing.append("a VLM chain feeds the decoder embeddings (the genai loop appends token ids)")
    if not missing:
        return LoopChoice("genai", folder, f"{GENAI_CONFIG} beside the model, onnxruntime-genai {version}")
    if runtime == "genai":
        raise BackendUnavailable("--runtime genai: " + "; ".join(missing))
    return LoopChoice("ort", folder, "auto: " + "; ".join(missing))


def loop_provenance(choice: LoopChoice) -> str:
    """The provenance ``loop`` entry: ``genai 0.18.0`` or ``ort``."""
    return f"genai {genai_version()}" if choice.is_genai else "ort"


def loaded_ort_libraries(maps: str | None = None) -> list[str]:
    """Paths of the libonnxruntime.so files this process has mapped (/proc/self/maps; [] elsewhere)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    seen: list[str] = []
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and "libonnxruntime.so" in parts[5] and parts[5] not in seen:
            seen.append(parts[5].strip())
    return seen


def ort_mismatch(libraries: list[str], module_version: str | None,
                 distributions: dict[str, str] | None = None) -> str | None:
    """A warning when the ONNX Runtime library genai loaded is not the ``onnxruntime`` module's version (the
    sweep times the module's) or not every installed ONNX Runtime distribution's (an overlaid flavour, e.g.
    onnxruntime-gpu installed over genai's onnxruntime, replaced the runtime genai was installed with), else None."""
    versions = sorted({m.group(1) for lib in libraries if (m := _ORT_LIB.search(lib))})
    if not versions:
        return None
    claims = {} if module_version is None else {"the onnxruntime module the sweep times": module_version}
    claims.update({f"the installed distribution {name}": v for name, v in (distributions or {}).items()})
    off = [f"{who} {v}" for who, v in claims.items() if [v.split("+")[0]] != versions]
    if not off:
        return None
    return (f"onnxruntime-genai loaded ONNX Runtime {', '.join(versions)} ({', '.join(libraries)}), but "
            f"{'; '.join(off)}: the loop terms and the engine model may come from different ONNX Runtime "
            "builds (keep one ONNX Runtime distribution in this venv)")


class GenaiLoop(Closing):
    """Requests run through onnxruntime-genai's Generator (the replay's runner surface)."""

    token_input = "input_ids"

    def __init__(self, model_dir: str | os.PathLike[str], intra_op_threads: int = 0, huge_pages: bool = False,
                 warmup: bool = True) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime_genai does not import ({exc}); pip install onnxruntime-genai") \
                from None
        from trt_latency.engines.ort.runner import cpu_name

        self.model_dir = Path(model_dir)
        cfg_path = self.model_dir / GENAI_CONFIG
        try:
            meta = json.loads(cfg_path.read_text())
            model = meta["model"]
            self.vocab = int(model["vocab_size"])
            self.hidden = int(model["decoder"]["hidden_size"])
            self.context = int(model.get("context_length") or meta["search"]["max_length"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"cannot read the genai config ({exc})", path=str(cfg_path),
                             field="model.vocab_size / model.decoder.hidden_size / model.context_length",
                             expected="onnxruntime-genai's genai_config.json") from None
        self._og = og
        config = og.Config(str(self.model_dir))
        config.clear_providers()  # CPU
        session: dict[str, Any] = {"inter_op_num_threads": 1}
        if intra_op_threads:
            session["intra_op_num_threads"] = int(intra_op_threads)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.model = og.Model(config)
        self.threads = (int(intra_op_threads), 1)
        self.backend = "ort-cpu"
        self.device = cpu_name()
        self.loop = f"genai {getattr(og, '__version__', 'unknown')}"
        self.memory = "4 KiB pages (huge pages off)"
        if huge_pages:  # the sweep's backing, so the loop terms are taken on the same pages
            from trt_latency.engines.hugepages import back_with_huge_pages

            self.memory = back_with_huge_pages().describe()
        if warmup:  # the first Generator pays one-off allocations a serving process has behind it
            self.generate(np.arange(1, 9, dtype=np.int64)[None] % self.vocab, 3)

    def random_prompt(self, length: int, rng: np.random.Generator) -> np.ndarray:
        return draw_prompt(rng, length, vocab=self.vocab)

    def generate(self, prompt: np.ndarray, output_tokens: int) -> GenerateResult:
        """append_tokens(prompt ids [1, P]) then ``output_tokens`` generate_next_token calls, timed."""
        ids = np.asarray(prompt)
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"the genai loop takes token ids [1, P], got {ids.dtype} {list(ids.shape)}")
        p = int(ids.shape[1])
        if output_tokens < 1 or p + output_tokens > self.context:
            raise ValueError(f"output_tokens must be in [1, {self.context - p}] for a {p}-token prompt "
                             f"(context {self.context}), got {output_tokens}")
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=p + output_tokens, min_length=p + output_tokens, do_sample=False)
        gen = og.Generator(self.model, params)
        tokens_in = np.ascontiguousarray(ids[0], dtype=np.int32)
        clock = time.perf_counter_ns
        t_start = clock()
        gen.append_tokens(tokens_in)
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        ttft = clock()
        steps: list[float] = []
        for _ in range(output_tokens - 1):
            t0 = clock()
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            steps.append((clock() - t0) * 1e-6)
        end = clock()
        del gen
        return GenerateResult(ttft_ms=(ttft - t_start) * 1e-6, total_ms=(end - t_start) * 1e-6, step_ms=steps,
                              tokens=tokens)

    def ort_warning(self) -> str | None:
        """ort_mismatch for this process: the libonnxruntime genai mapped vs the onnxruntime module."""
        try:
            import onnxruntime as ort

            module = str(ort.__version__)
        except ImportError:
            module = None
        from trt_latency.engines.ort.runtime_info import ort_distributions  # the one reader of the flavours

        return ort_mismatch(loaded_ort_libraries(), module, dict(ort_distributions()))

    def close(self) -> None:
        self.model = None


def open_replay_runner(choice: LoopChoice, open_ort: Any, intra_op_threads: int = 0, huge_pages: bool = False,
                       say: Any = print, processes: int = 0) -> Any:
    """The runner a replay goes through: GenaiLoop for a genai choice, else ``open_ort()`` (the ORT runner
    the sweep used); with ``processes`` > 0, that runner in as many fresh processes
    (engines/replay_processes.py; ``open_ort`` must then pickle). Says which loop, and which ORT genai
    loaded when that is not the sweep's."""
    from functools import partial

    # a replay process warms whatever it opens (engines/replay_processes.py): GenaiLoop's own warm-up only here
    opener = (partial(GenaiLoop, choice.model_dir, intra_op_threads, huge_pages, warmup=processes == 0)
              if choice.is_genai else open_ort)
    if processes > 0:
        from trt_latency.engines.replay_processes import ReplayProcesses

        runner = ReplayProcesses(opener, processes)
        where = f", in {processes} fresh process{'es' if processes > 1 else ''} (runtime.replay_processes)"
    else:
        runner, where = opener(), ""
    if choice.is_genai or where:
        threads = getattr(runner, "threads", (0, 0))[0]
        say(f"  replay loop: {getattr(runner, 'loop', 'ort')} ({choice.why}), {threads or 'default'} "
            f"intra-op thread(s){where}")
    warning = runner.ort_warning() if hasattr(runner, "ort_warning") else None
    if warning:
        say(f"  warning: {warning}")
    return runner
