"""A random-weight decoder shaped like Qwen2.5-0.5B (hidden 896, 14 heads, 2 KV heads, vocab 151936), built by
onnxruntime-genai's own builder, for benchmarks/first_step.py. Never committed; needs a scratch venv with
torch (the CPU wheel: pip install torch==2.13.0), transformers and onnxruntime-genai; HF_HUB_OFFLINE=1.

    python benchmarks/make_qwen_shaped.py OUT_DIR [--layers 24] [--precision int4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--precision", default="int4", choices=("int4", "fp32"))
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = args.out / "hf"
    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                      rope_theta=1e6, rms_norm_eps=1e-6, torch_dtype="float32")
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(hf)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                    str(args.out / args.precision), "-p", args.precision, "-e", "cpu", "-c", str(args.out / "cache")],
                   check=True)


if __name__ == "__main__":
    main()
