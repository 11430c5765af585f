"""`trt-latency calibrate`: parses its flags into CalibrateOptions and calls trt_latency.pipeline.calibrate
(export -> sweep -> fit -> replay -> serving-loop terms -> conformal factors; resumable: see its docstring),
or trt_latency.cluster.calibrate_on_ray with --ray.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from trt_latency.cli._args import positive_int
from trt_latency.cli._model import add_model_args, backend_choices

DEFAULT_OUT = "trt-latency-out"  # = trt_latency.pipeline.DEFAULT_OUT (not imported: --help stays light)

EXAMPLE = """\
examples:
  trt-latency calibrate --quick                     # packaged default plan, first config, < 2 min on 2 cores
  trt-latency calibrate --out out                   # all configs of configs/default.yaml
  trt-latency calibrate my_plan.yaml --backend ort-cuda --out out
  trt-latency calibrate --onnx decoder.onnx --out out   # time your own exported decoder
  trt-latency calibrate --onnx genai/model.onnx --kv-mode shared --max-past-len 2048 --out out
  trt-latency calibrate plan.yaml --engine decoder.plan --out out   # a TensorRT engine (GPU host)
  trt-latency calibrate --ray --out out             # the plan's configs over local Ray actors, one per device
  trt-latency calibrate --onnx a.onnx --onnx b.onnx --ray auto --out out   # two models on a running cluster
  trt-latency calibrate --onnx genai-embeds/model.onnx --vision-onnx vision.onnx --embedding-onnx embedding.onnx \
      --out out                                     # a VLM chain: encoder + embedding step + decoder

Writes OUT/{model.onnx, samples.csv, calibration.yaml, decode.png, requests.csv}; with --ray, one such folder
per device class, OUT/<device>/; with several --onnx / --engine, one OUT/<model name>/ per model. Rerunning
with the same --out resumes: finished sweep rows and replayed requests are kept.
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "calibrate",
        help="export, time per KV position, fit, plot and replay: the whole calibration in one command",
        description=textwrap.fill(
            "Export the plan's reference decoder(s) (or take --onnx / --engine), time each decode step per "
            "KV-cache position and prefill per prompt length, fit the position-dependent decode model, write "
            "calibration.yaml and decode.png, and replay real end-to-end requests into requests.csv."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="plan YAML (tiers, configs, sweep, replay); default: the packaged configs/default.yaml")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--onnx", metavar="F", action="append",
                        help="time this ONNX decoder instead of exporting the plan's models (repeatable: each "
                             "model its own OUT/<name>/)")
    source.add_argument("--engine", metavar="F", action="append",
                        help="time this TensorRT engine (implies --backend tensorrt; repeatable)")
    parser.add_argument("--backend", choices=backend_choices(), default="auto",
                        help="runtime (default auto: TensorRT EP / CUDA EP when usable, else the CPU provider)")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="first config only, the plan's quick: preset (a looser precision and time budget, "
                             "a smaller replay)")
    parser.add_argument("--precision", type=float, metavar="P",
                        help="target relative standard error of every position's median, e.g. 0.006 "
                             "(default: the plan's sweep.adaptive.precision; 0 = the fixed plan, every round)")
    parser.add_argument("--time-budget", type=float, metavar="S",
                        help="cap the whole calibrate at S seconds: batch sweep, sweep, replay and vision (default: "
                             "the plan's sweep.adaptive.time_budget_s); the summary says where the time went")
    parser.add_argument("--max-prompt", type=positive_int, metavar="N",
                        help="longest prompt to time on a model you bring (--onnx): the prefill grid's last length (default: "
                             "the plan's sweep.prefill.model_max_len, 1024; capped by the model's context). Longer "
                             "prompts are extrapolated and flagged; 2048 times them, but the quadratic prefill then "
                             "bends wrong in between (docs/decisions.md 18)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="ONNX Runtime intra-op threads of the runner (default: the plan's "
                             "runtime.intra_op_threads); printed in the summary, recorded in provenance")
    parser.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=None,
                        help="time on 2 MiB pages (CPU; default: the plan's runtime.huge_pages, false: the backing an "
                             "ordinary process gets). Serve on the same: trt_latency.apply_backing (README)")
    parser.add_argument("--replay-processes", type=int, metavar="K",
                        help="replay in K fresh processes that each load the model once, as a server does, requests "
                             "round-robin (CPU; default: the plan's runtime.replay_processes, 3; 0: in this "
                             "process). A process's step level is drawn when it loads the model: the loop terms "
                             "then see K such draws, not this process's one (docs/decisions.md 14)")
    parser.add_argument("--no-replay", action="store_true", help="skip the end-to-end replay into requests.csv")
    parser.add_argument("--requests", type=int, metavar="N", help="replay N requests (default: the plan's replay size)")
    parser.add_argument("--runtime", choices=("auto", "ort", "genai"), default="auto",
                        help="the loop the replay runs requests through: genai = onnxruntime-genai's Generator "
                             "(the model's folder has genai_config.json); auto (default) = genai where that "
                             "config is there and onnxruntime_genai imports, else our ONNX Runtime loop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plot", action="store_true", help="skip decode.png (matplotlib takes seconds)")
    parser.add_argument("--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
                        help="spread the (model, config) work items over Ray actors, one per device (GPU, or "
                             "intra_op_threads CPUs); no ADDRESS: start a local Ray, 'auto' or host:port: join a "
                             "cluster. Needs pip install \"trt-latency[cluster]\"")
    parser.add_argument("--ray-actors", type=int, metavar="N", help="with --ray: at most N actors")
    add_model_args(parser)
    vlm = parser.add_argument_group("VLM: vision encoder and embedding step (README: VLM: the vision encoder)")
    vlm.add_argument("--vision-onnx", metavar="F", help="time this vision encoder too (calibration.yaml gains "
                     "a vision section; the replay runs encoder -> embedding -> decoder)")
    vlm.add_argument("--vision-family", choices=("vit", "qwen2.5-vl"),
                     help="how patches become encoder inputs (default: config.json model_type beside the model)")
    vlm.add_argument("--vision-config", metavar="config.json", help="the encoder's config.json (patch_size, ...)")
    vlm.add_argument("--vision-feeds", metavar="module:function",
                     help="your own feeds builder: function(signature, patches, images, rng) -> {name: array}")
    vlm.add_argument("--vision-tokens-per-patch", type=float, metavar="X",
                     help="LLM tokens per patch with --vision-feeds (families know theirs)")
    vlm.add_argument("--embedding-onnx", metavar="F", help="the embedding step (token ids + image features -> "
                     "inputs_embeds) between encoder and decoder")
    vlm.add_argument("--vision-images-per-call", choices=("together", "separate"), default="together",
                     help="a request's images go to the encoder in one call (default) or one call each")
    vlm.add_argument("--vision-patches", type=int, nargs=2, metavar=("LO", "HI"), default=(16, 1024),
                     help="patches per image swept (default 16 1024)")
    vlm.add_argument("--vision-points", type=int, default=8, metavar="K", help="patch counts swept (default 8)")
    parser.set_defaults(func=run)


LOCAL_RAY = "local"


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from trt_latency.pipeline import CalibrateOptions, calibrate

    def say(text: str) -> None:
        print(text, flush=True)

    if getattr(args, "ray", None) and args.ray.endswith((".yaml", ".yml")) and args.config is None:
        args.config, args.ray = args.ray, LOCAL_RAY  # `--ray plan.yaml`: the optional ADDRESS took the plan
    models, engines = list(args.onnx or []), list(args.engine or [])
    options = replace(CalibrateOptions.from_namespace(args), onnx=None, engine=None)
    if getattr(args, "ray", None) is not None:
        from trt_latency.cluster import calibrate_on_ray

        calibrate_on_ray(options, models=models, engines=engines, address=None if args.ray == LOCAL_RAY else args.ray,
                         say=say, max_actors=args.ray_actors)
        return 0
    sources = [("onnx", m) for m in models] + [("engine", e) for e in engines]
    if len(sources) <= 1:
        kind, src = sources[0] if sources else ("", None)
        calibrate(replace(options, onnx=src if kind == "onnx" else None, engine=src if kind == "engine" else None),
                  say=say)
        return 0
    from trt_latency.cluster import model_names  # plain naming helper: no Ray needed

    for (kind, src), name in zip(sources, model_names([s for _, s in sources]), strict=True):
        calibrate(replace(options, onnx=src if kind == "onnx" else None, engine=src if kind == "engine" else None,
                          out=str(Path(options.out) / name)), say=say)
    return 0
