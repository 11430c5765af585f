"""Random-weight decoders shaped like Qwen2.5-0.5B / 1.5B, built by onnxruntime-genai's own builder.

Run in the scratch venv of setup.sh (torch CPU, transformers, onnxruntime-genai); nothing is downloaded
(the HF checkpoint is made from a config, HF_HUB_OFFLINE=1) and nothing lands in the repo:

    /work/scratch/genai-venv/bin/python benchmarks/realsize/make_models.py              # 0.5B int4, then fp32
    /work/scratch/genai-venv/bin/python benchmarks/realsize/make_models.py --size 1.5b --precision int4

Writes OUT/hf-qwen2.5-<size>/ (save_pretrained) and OUT/qwen2.5-<size>-<precision>/ (model.onnx,
model.onnx.data, genai_config.json), OUT default /work/scratch/models. The shapes are the published
Qwen2.5 configs; the weights are random, which changes no timing (the same GEMMs, the same bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # Qwen2.5-0.5B / -1.5B config.json (the numbers that set the cost of a step)
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, tie_word_embeddings=True),
}
COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
              use_sliding_window=False, bos_token_id=151643, eos_token_id=151643, torch_dtype="float32")
TOKENIZER_WORDS = 512  # a stand-in tokenizer for builders that look for one; the benchmark feeds token ids


def make_hf(size: str, out: Path) -> Path:
    """save_pretrained a random-weight Qwen2 of ``size`` into ``out`` (kept: the builder rereads it)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**COMMON, **SHAPES[size])
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(out)
    print(json.dumps({"hf": str(out), "params": sum(p.numel() for p in model.parameters())}), flush=True)
    return out


def _save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, TOKENIZER_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(out)


def build(hf: Path, out: Path, precision: str, cache: Path) -> Path:
    """onnxruntime-genai's builder, as a user runs it: ``-p PRECISION -e cpu``."""
    if (out / "genai_config.json").is_file():
        print(f"{out}: already built", flush=True)
        return out
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(json.dumps({"model": str(out / "model.onnx"), "bytes": size,
                      "build_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--precision", action="append", choices=("int4", "fp32", "fp16"),
                    help="repeatable; default int4 then fp32")
    ap.add_argument("--out", type=Path, default=Path("/work/scratch/models"))
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    hf = make_hf(args.size, args.out / f"hf-qwen2.5-{args.size}")
    for precision in args.precision or ["int4", "fp32"]:
        build(hf, args.out / f"qwen2.5-{args.size}-{precision}", precision, args.out / "cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
