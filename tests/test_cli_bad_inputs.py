"""Bad input to every `trt-latency` verb: one stderr line naming file, place and expectation; exit 1 (2 for usage).

One table: (verb, case) -> the argv, the single change made to an otherwise valid set of inputs, the exit code
and the pieces the error line must contain. The inputs are tiny and valid (a 2-layer plan, a hand-written
samples.csv, the calibration `fit` makes of it, a 2-request log, the plan's exported model), so each case
fails on exactly the one thing it breaks, before any sweep or replay work. Cases already covered in
test_tool_errors.py, test_engines_cli.py and test_estimator_cli.py are not repeated here.
"""

from __future__ import annotations

import csv
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from trt_latency.cli import main

PLAN = """\
schema_version: 1
tiers:
  - {tier_idx: 0, name: tiny, hidden: 64, layers: 2, heads: 4, kv_heads: 2, head_dim: 16, intermediate: 128,
     vocab: 64, experts: 1, dtype: float32, max_past_len: 128, max_prefill_len: 32}
configs:
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
runtime: {intra_op_threads: 1, inter_op_threads: 1}
sweep:
  decode: {log_points: 3, linear_points: 2, reps: 2, warmup: 0}
  prefill: {lengths: [4, 16], reps: 2}
  seed: 0
replay:
  requests: 2
  vision_tokens: [0, 8]
  text_tokens: [1, 16]
  output_tokens: [2, 6]
  seed: 0
"""
SAMPLES_HEADER = "tier_idx,top_k,num_active_blocks,batch,phase,past_len,new_tokens,rep,latency_ms,backend,device,kv_mode"
# One known decode row; the other rows follow T(L) = 1 + 0.002 L ms, prefill 0.5 + 0.02 S ms.
SAMPLES_ROW = "0,1,2,1,decode,4,1,0,1.0080,ort-cpu,cpu,concat"
REQUESTS = """\
request_id,vision_tokens,text_tokens,output_tokens,tier_idx,top_k,num_active_blocks,ttft_ms,total_ms
0,0,16,3,0,1,2,1.0,3.0
1,8,16,12,0,1,2,1.5,13.5
"""
BAD_YAML = "schema_version: 1\nconfigs: [\n"
# the first decode value of config 0, whatever the fit made it
CAL_FIRST_VALUE = re.compile(r"(decode_values_ms: \[)[^,\]]+")


def _write_samples(path: Path) -> None:
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(SAMPLES_HEADER.split(","))
        out.writerow(SAMPLES_ROW.split(","))
        for rep in range(3):
            for past_len in (1, 2, 8, 16, 32, 64, 128):
                out.writerow([0, 1, 2, 1, "decode", past_len, 1, rep, f"{1.0 + 0.002 * past_len + 0.01 * rep:.4f}",
                              "ort-cpu", "cpu", "concat"])
            for new_tokens in (4, 16, 32):
                out.writerow([0, 1, 2, 1, "prefill", 0, new_tokens, rep, f"{0.5 + 0.02 * new_tokens + 0.01 * rep:.4f}",
                              "ort-cpu", "cpu", "concat"])


@pytest.fixture(scope="module")
def valid_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """plan.yaml, samples.csv, calibration.yaml (from `fit`), requests.csv, model.onnx (from `export`)."""
    d = tmp_path_factory.mktemp("valid")
    (d / "plan.yaml").write_text(PLAN)
    _write_samples(d / "samples.csv")
    (d / "requests.csv").write_text(REQUESTS)
    assert main(["fit", str(d / "samples.csv"), "-o", str(d / "calibration.yaml")]) == 0
    try:
        import onnx  # noqa: F401
    except ImportError:  # only the cases marked needs=ORT use the model; they skip
        return d
    assert main(["export", str(d / "plan.yaml"), "-o", str(d / "model.onnx")]) == 0
    return d


@dataclass(frozen=True)
class Case:
    """argv and needles use {d} for the folder holding the (mutated) inputs."""

    verb: str
    name: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    code: int = 1
    # one change: (file, old, new) replaces old (a string or a regex) by new once; (file, None, text) writes it
    change: tuple[str, str | re.Pattern[str] | None, str] | None = None
    needs: tuple[str, ...] = field(default=())  # importable modules the case needs
    known_bug: str = ""  # strict xfail: the verb does not do this yet (the fix is named)

    @property
    def id(self) -> str:
        return f"{self.verb}-{self.name}"


def C(verb: str, name: str, argv: str, *needles: str, code: int = 1,
      change: tuple[str, str | re.Pattern[str] | None, str] | None = None, needs: tuple[str, ...] = (),
      known_bug: str = "") -> Case:  # noqa: N802
    return Case(verb, name, tuple(argv.split()), needles, code, change, needs, known_bug)


P, S, K, R = "plan.yaml", "samples.csv", "calibration.yaml", "requests.csv"
PRED = "--text-tokens 5 --output-tokens 3"
ADMIT = "--budget-ms 50 --text-tokens 5"
CHOOSE = "--budget-ms 50 --text 5 --max-new-tokens 4"
CAL_NAN = (K, CAL_FIRST_VALUE, r"\1.nan")
CAL_NO_KEY = (K, "  prefill_coeffs:", "  prefill_coefs:")
LT = "loadtest -c {d}/calibration.yaml --onnx {d}/model.onnx --plan {d}/plan.yaml"
ORT = ("onnx", "onnxruntime")

CASES = [
    # ---- calibrate (missing file, malformed YAML, unknown tier, usage: test_tool_errors.py)
    C("calibrate", "nan", "calibrate {d}/plan.yaml --out {d}/o",
      "{d}/plan.yaml", "field 'tiers[0].hidden'", "expected an integer >= 1", "got nan",
      change=(P, "hidden: 64", "hidden: .nan")),
    C("calibrate", "missing-field", "calibrate {d}/plan.yaml --out {d}/o",
      "{d}/plan.yaml", "field 'tiers[0].hidden'", "missing key", change=(P, "hidden: 64, ", "")),
    C("calibrate", "wrong-column-resume", "calibrate {d}/plan.yaml --out {d} --backend ort-cpu --no-replay --no-progress",
      "{d}/samples.csv", "another header", "expected " + SAMPLES_HEADER, "lat_ms",
      change=(S, "latency_ms", "lat_ms"), needs=ORT),
    C("calibrate", "bad-flag-value", "calibrate {d}/plan.yaml --out {d}/o --requests -1",
      "field '--requests'", "expected an integer >= 0", "got -1"),
    # ---- export (--top-k, --index: test_engines_cli.py)
    C("export", "missing-file", "export {d}/none.yaml -o {d}/m.onnx", "{d}/none.yaml: file not found",
      "expected a YAML plan file"),
    C("export", "malformed-yaml", "export {d}/plan.yaml -o {d}/m.onnx", "{d}/plan.yaml: malformed YAML at line 3",
      "expected a YAML mapping", change=(P, None, BAD_YAML)),
    C("export", "nan", "export {d}/plan.yaml -o {d}/m.onnx", "{d}/plan.yaml", "field 'tiers[0].max_past_len'",
      "expected an integer >= 1", "got nan", change=(P, "max_past_len: 128", "max_past_len: .nan")),
    C("export", "wrong-field", "export {d}/plan.yaml -o {d}/m.onnx", "{d}/plan.yaml", "field 'tiers[0].hiddn'",
      "unknown key", "expected one of the keys tier_idx", change=(P, "hidden: 64", "hiddn: 64")),
    C("export", "unknown-tier", "export {d}/plan.yaml --tier 9 -o {d}/m.onnx", "{d}/plan.yaml", "field 'tier_idx'",
      "expected one of 0", "got 9"),
    C("export", "bad-flag-value", "export {d}/plan.yaml --tier 0 --blocks 5 -o {d}/m.onnx", "{d}/plan.yaml",
      "field '--blocks'", "expected 1 .. 2 (tier 0)", "got 5"),
    C("export", "usage", "export --tier x", "argument --tier: invalid int value: 'x'", code=2),
    # ---- sweep (missing plan, missing --onnx: test_engines_cli.py)
    C("sweep", "malformed-yaml", "sweep {d}/plan.yaml --out {d}/s.csv", "{d}/plan.yaml: malformed YAML at line 3",
      change=(P, None, BAD_YAML)),
    C("sweep", "nan", "sweep {d}/plan.yaml --out {d}/s.csv", "{d}/plan.yaml", "field 'sweep.decode.reps'",
      "expected an integer >= 1", "got nan", change=(P, "reps: 2, warmup", "reps: .nan, warmup")),
    C("sweep", "unknown-tier", "sweep {d}/plan.yaml --tier 9 --out {d}/s.csv", "{d}/plan.yaml", "field 'tier_idx'",
      "expected one of 0", "got 9"),
    C("sweep", "missing-engine", "sweep {d}/plan.yaml --engine {d}/none.plan --out {d}/s.csv",
      "{d}/none.plan: file not found", "expected an ONNX model or TensorRT engine file"),
    C("sweep", "wrong-column-resume",
      "sweep {d}/plan.yaml --backend ort-cpu --threads 1 --no-progress --out {d}/samples.csv",
      "{d}/samples.csv", "another header", "expected " + SAMPLES_HEADER, "lat_ms",
      change=(S, "latency_ms", "lat_ms"), needs=ORT),
    C("sweep", "bad-flag-value", "sweep {d}/plan.yaml --all --tier 0 --out {d}/s.csv", "field '--all'",
      "expected --all without --onnx/--engine/--tier/--index"),
    C("sweep", "usage", "sweep --backend cuda", "argument --backend: invalid choice: 'cuda'", code=2),
    # ---- fit (missing samples, no input: test_estimator_cli.py)
    C("fit", "wrong-column", "fit {d}/samples.csv -o {d}/c.yaml", "{d}/samples.csv", "row 1, field 'latency_ms'",
      "expected a header with columns phase,past_len,new_tokens,latency_ms", change=(S, "latency_ms", "lat_ms")),
    C("fit", "nan", "fit {d}/samples.csv -o {d}/c.yaml", "{d}/samples.csv", "row 2, field 'latency_ms'",
      "expected a finite number > 0", "got 'nan'", change=(S, SAMPLES_ROW, SAMPLES_ROW.replace("1.0080", "nan"))),
    C("fit", "not-an-integer", "fit {d}/samples.csv -o {d}/c.yaml", "{d}/samples.csv", "row 2, field 'past_len'",
      "expected an integer", "got 'x4'", change=(S, SAMPLES_ROW, SAMPLES_ROW.replace(",4,", ",x4,"))),
    C("fit", "bad-phase", "fit {d}/samples.csv -o {d}/c.yaml", "{d}/samples.csv", "row 2, field 'phase'",
      "expected 'decode' or 'prefill'", "got 'decod'", change=(S, SAMPLES_ROW, SAMPLES_ROW.replace("decode", "decod"))),
    C("fit", "short-row", "fit {d}/samples.csv -o {d}/c.yaml", "{d}/samples.csv", "row 2", "expected 12 comma-separated fields",
      change=(S, SAMPLES_ROW, "0,1,2,1,decode,4,1")),
    C("fit", "empty-file", "fit {d}/samples.csv -o {d}/c.yaml", "{d}/samples.csv: empty file",
      "expected a header row " + SAMPLES_HEADER, change=(S, None, "")),
    C("fit", "trtexec-missing", "fit --trtexec-times {d}/decode_L4.json -o {d}/c.yaml",
      "{d}/decode_L4.json: file not found", "expected a trtexec --exportTimes JSON file"),
    C("fit", "trtexec-malformed", "fit --trtexec-times {d}/decode_L4.json -o {d}/c.yaml",
      "{d}/decode_L4.json: malformed JSON at line 1", "expected a trtexec --exportTimes file",
      change=("decode_L4.json", None, '[{"computeMs": 1.0')),
    C("fit", "trtexec-nan", "fit --trtexec-times {d}/decode_L4.json -o {d}/c.yaml", "{d}/decode_L4.json",
      "field 'computeMs'", "expected a finite number > 0", change=("decode_L4.json", None, '[{"computeMs": NaN}]')),
    C("fit", "trtexec-no-shape", "fit --trtexec-times {d}/t.json -o {d}/c.yaml", "{d}/t.json", "field 'shape'",
      "expected a name like decode_L512.json", change=("t.json", None, '[{"computeMs": 1.0}]')),
    C("fit", "missing-engine", "fit {d}/samples.csv --engine {d}/none.plan -o {d}/c.yaml",
      "{d}/none.plan: cannot read"),
    C("fit", "bad-flag-value", "fit --trtexec-shape past_len=4", "field '--trtexec-shape'",
      "expected --trtexec-times FILE..."),
    C("fit", "usage", "fit {d}/samples.csv --trtexec-times", "argument --trtexec-times: expected at least one",
      code=2),
    # ---- predict (missing CAL, --output-tokens 0: test_estimator_cli.py)
    C("predict", "malformed-yaml", f"predict -c {{d}}/calibration.yaml {PRED}",
      "{d}/calibration.yaml: malformed YAML at line 3", change=(K, None, BAD_YAML)),
    C("predict", "nan", f"predict -c {{d}}/calibration.yaml {PRED}", "{d}/calibration.yaml",
      "field 'configs[0].decode_values_ms[0]'", "expected a finite number > 0", "got nan", change=CAL_NAN),
    C("predict", "wrong-field", f"predict -c {{d}}/calibration.yaml {PRED}", "{d}/calibration.yaml",
      "field 'configs[0].prefill_coeffs'", "missing key", change=CAL_NO_KEY),
    C("predict", "unknown-tier", f"predict -c {{d}}/calibration.yaml {PRED} --tier 9", "{d}/calibration.yaml",
      "field 'tier_idx/top_k/num_active_blocks'", "unknown config", "expected one of (0, 1, 2)", "got (9, 1, None)"),
    C("predict", "unknown-blocks", f"predict -c {{d}}/calibration.yaml {PRED} --blocks 7", "{d}/calibration.yaml",
      "unknown config", "got (0, 1, 7)"),
    C("predict", "nan-flag", f"predict -c {{d}}/calibration.yaml {PRED} --quantile nan", "{d}/calibration.yaml",
      "field 'quantile'", "expected a number in (0, 1)", "got nan"),
    C("predict", "bad-flag-value", "predict -c {d}/calibration.yaml --text-tokens -5 --output-tokens 3",
      "{d}/calibration.yaml", "field 'text_tokens'", "expected an integer in [0, ", "got -5"),
    C("predict", "usage", "predict -c {d}/calibration.yaml --text-tokens five --output-tokens 3",
      "argument --text-tokens: invalid int value: 'five'", code=2),
    # ---- admit (an unknown tier is a REJECT decision, see test_admit_unknown_tier_rejects)
    C("admit", "missing-file", f"admit -c {{d}}/none.yaml {ADMIT}", "{d}/none.yaml: file not found"),
    C("admit", "malformed-yaml", f"admit -c {{d}}/calibration.yaml {ADMIT}",
      "{d}/calibration.yaml: malformed YAML at line 3", change=(K, None, BAD_YAML)),
    C("admit", "nan", f"admit -c {{d}}/calibration.yaml {ADMIT}", "{d}/calibration.yaml",
      "field 'configs[0].decode_values_ms[0]'", "expected a finite number > 0", change=CAL_NAN),
    C("admit", "wrong-field", f"admit -c {{d}}/calibration.yaml {ADMIT}", "{d}/calibration.yaml",
      "field 'configs[0].prefill_coeffs'", "missing key", change=CAL_NO_KEY),
    C("admit", "nan-budget", "admit -c {d}/calibration.yaml --budget-ms nan --text-tokens 5",
      "argument --budget-ms: expected a finite number of ms >= 0, got 'nan'", code=2),
    C("admit", "negative-budget", "admit -c {d}/calibration.yaml --budget-ms -3 --text-tokens 5",
      "argument --budget-ms: expected a finite number of ms >= 0, got '-3'", code=2),
    C("admit", "bad-alpha", f"admit -c {{d}}/calibration.yaml {ADMIT} --alpha 2",
      "argument --alpha: expected a number in (0, 1), got '2'", code=2),
    C("admit", "zero-tokens", f"admit -c {{d}}/calibration.yaml {ADMIT} --max-new-tokens 0",
      "argument --max-new-tokens: expected an integer >= 1, got '0'", code=2),
    C("admit", "usage", "admit -c {d}/calibration.yaml --budget-ms fast --text-tokens 5",
      "argument --budget-ms: expected a finite number of ms >= 0, got 'fast'", code=2),
    # ---- choose (no config fits is a REJECT decision, exit 0: test_estimator_choose.py)
    C("choose", "missing-file", f"choose -c {{d}}/none.yaml {CHOOSE}", "{d}/none.yaml: file not found"),
    C("choose", "bad-preference", f"choose -c {{d}}/calibration.yaml {CHOOSE}", "{d}/calibration.yaml",
      "field 'preference[0]'", "expected a measured config", "got '(5, 1, 9)'",
      change=(K, re.compile(r"^schema_version: 1", re.M),
              "preference:\n- {tier_idx: 5, top_k: 1, num_active_blocks: 9}\nschema_version: 1")),
    C("choose", "negative-tokens", f"choose -c {{d}}/calibration.yaml {CHOOSE} --vision -3", "{d}/calibration.yaml",
      "field 'vision'", "expected an integer >= 0", "got -3"),
    C("choose", "bad-candidate", f"choose -c {{d}}/calibration.yaml {CHOOSE} --candidates 0,1",
      "argument --candidates: expected TIER,TOP_K,BLOCKS", code=2),
    C("choose", "usage", "choose -c {d}/calibration.yaml --budget-ms 50 --text 5",
      "the following arguments are required: --max-new-tokens", code=2),
    # ---- replay
    C("replay", "missing-file", "replay {d}/none.yaml --out {d}/r.csv", "{d}/none.yaml: file not found",
      "expected a YAML plan file"),
    C("replay", "malformed-yaml", "replay {d}/plan.yaml --out {d}/r.csv", "{d}/plan.yaml: malformed YAML at line 3",
      change=(P, None, BAD_YAML)),
    C("replay", "nan", "replay {d}/plan.yaml --out {d}/r.csv", "{d}/plan.yaml", "field 'replay.output_tokens[1]'",
      "expected an integer >= 1", "got nan", change=(P, "output_tokens: [2, 6]", "output_tokens: [2, .nan]")),
    C("replay", "unknown-tier", "replay {d}/plan.yaml --tier 9 --out {d}/r.csv", "{d}/plan.yaml",
      "field 'tier_idx'", "expected one of 0", "got 9"),
    C("replay", "missing-onnx", "replay {d}/plan.yaml --onnx {d}/none.onnx --backend ort-cpu --out {d}/r.csv",
      "{d}/none.onnx: file not found", "expected an ONNX model"),
    C("replay", "wrong-column-resume", "replay {d}/plan.yaml --backend ort-cpu --no-progress --out {d}/requests.csv",
      "{d}/requests.csv", "row 1", "expected", "total_ms", change=(R, "total_ms", "e2e_ms"), needs=ORT),
    C("replay", "bad-flag-value", "replay {d}/plan.yaml -n 0 --out {d}/r.csv", "field '--requests'",
      "expected an integer >= 1", "got 0"),
    C("replay", "usage", "replay -n many", "argument -n/--requests: invalid int value: 'many'", code=2),
    # ---- analyze (missing log, missing column, NaN, 1 output token, bad/missing CAL, usage: test_tool_errors.py)
    C("analyze", "short-row", "analyze {d}/requests.csv", "{d}/requests.csv", "row 3",
      "expected 9 comma-separated fields, got 8", change=(R, "1.5,13.5", "1.5")),
    C("analyze", "not-an-integer", "analyze {d}/requests.csv", "{d}/requests.csv", "row 3, field 'text_tokens'",
      "expected an integer >= 0", "got 'sixteen'", change=(R, "1,8,16,", "1,8,sixteen,")),
    C("analyze", "empty-file", "analyze {d}/requests.csv", "{d}/requests.csv: empty file",
      "expected a header row", change=(R, None, "")),
    C("analyze", "nan-calibration", "analyze {d}/requests.csv -c {d}/calibration.yaml", "{d}/calibration.yaml",
      "field 'configs[0].decode_values_ms[0]'", "expected a finite number > 0", change=CAL_NAN),
    C("analyze", "unknown-tier", "analyze {d}/requests.csv -c {d}/calibration.yaml", "{d}/requests.csv",
      "row 2, field 'tier_idx/top_k/num_active_blocks'", "unknown config", "got (9, 1, 2)",
      change=(R, "0,0,16,3,0,1,2", "0,0,16,3,9,1,2")),
    C("analyze", "unwritable-plot", "analyze {d}/requests.csv --plot {d}/requests.csv/p.png",
      "{d}/requests.csv/p.png: cannot write the plot", "expected a writable PNG path", needs=("matplotlib",)),
    C("analyze", "usage-no-value", "analyze {d}/requests.csv -c", "argument -c/--calibration: expected one argument",
      code=2),
    # ---- compare
    C("compare", "missing-file", "compare {d}/none.csv", "{d}/none.csv: file not found", "expected a request log CSV"),
    C("compare", "short-row", "compare {d}/requests.csv", "{d}/requests.csv", "row 3",
      "expected 9 comma-separated fields, got 8", change=(R, "1.5,13.5", "1.5")),
    C("compare", "nan-calibration", "compare {d}/requests.csv -c {d}/calibration.yaml", "{d}/calibration.yaml",
      "field 'configs[0].decode_values_ms[0]'", "expected a finite number > 0", change=CAL_NAN),
    C("compare", "one-side-empty", "compare {d}/requests.csv", "{d}/requests.csv", "both halves need requests",
      change=(R, "1,8,16,12", "2,8,16,12")),
    C("compare", "unwritable-plot", "compare {d}/requests.csv --plot {d}/requests.csv/p.png",
      "{d}/requests.csv/p.png: cannot write the plot", "expected a writable PNG path", needs=("matplotlib",)),
    C("compare", "usage-alpha", "compare {d}/requests.csv --alpha 1.5",
      "argument --alpha: expected a number in (0, 1), got '1.5'", code=2),
    # ---- bench (bad schema_version: test_estimator_cli.py)
    C("bench", "missing-file", "bench -c {d}/none.yaml", "{d}/none.yaml: file not found"),
    C("bench", "malformed-yaml", "bench -c {d}/calibration.yaml", "{d}/calibration.yaml: malformed YAML at line 3",
      change=(K, None, BAD_YAML)),
    C("bench", "nan", "bench -c {d}/calibration.yaml", "{d}/calibration.yaml",
      "field 'configs[0].decode_values_ms[0]'", "expected a finite number > 0", change=CAL_NAN),
    C("bench", "zero-rounds", "bench -c {d}/calibration.yaml --rounds 0",
      "argument --rounds: expected an integer >= 1, got '0'", code=2),
    C("bench", "zero-number", "bench -c {d}/calibration.yaml --number 0",
      "argument --number: expected an integer >= 1, got '0'", code=2),
    C("bench", "zero-batch", "bench -c {d}/calibration.yaml --batch 0",
      "argument --batch: expected an integer >= 1, got '0'", code=2),
    C("bench", "usage", "bench -c {d}/calibration.yaml --rounds x", "argument --rounds: expected an integer >= 1",
      code=2),
    # ---- loadtest
    C("loadtest", "missing-file", "loadtest -c {d}/none.yaml", "{d}/none.yaml: file not found"),
    C("loadtest", "malformed-yaml", "loadtest -c {d}/calibration.yaml",
      "{d}/calibration.yaml: malformed YAML at line 3", change=(K, None, BAD_YAML)),
    C("loadtest", "nan", "loadtest -c {d}/calibration.yaml", "{d}/calibration.yaml",
      "field 'configs[0].decode_values_ms[0]'", "expected a finite number > 0", change=CAL_NAN),
    C("loadtest", "missing-onnx", "loadtest -c {d}/calibration.yaml --onnx {d}/none.onnx",
      "{d}/none.onnx: model not found", "expected the model.onnx"),
    C("loadtest", "missing-plan", LT.replace("{d}/plan.yaml", "{d}/none.yaml"), "{d}/none.yaml: file not found",
      needs=ORT),
    C("loadtest", "malformed-plan", LT, "{d}/plan.yaml: malformed YAML at line 3", change=(P, None, BAD_YAML),
      needs=ORT),
    C("loadtest", "nan-plan", LT, "{d}/plan.yaml", "field 'tiers[0].hidden'", "got nan",
      change=(P, "hidden: 64", "hidden: .nan"), needs=ORT),
    C("loadtest", "unknown-tier", LT, "{d}/calibration.yaml", "field 'configs'", "no config for the model",
      "(0, 1, 2)", "expected one of (9, 1, 2)", change=(K, "- tier_idx: 0\n  top_k", "- tier_idx: 9\n  top_k"),
      needs=ORT),
    C("loadtest", "wrong-column-log", LT + " --requests 1", "{d}/requests.csv", "field 'total_ms'",
      "missing column", change=(R, "total_ms", "e2e_ms"), needs=ORT),
    C("loadtest", "nan-log", LT + " --requests 1", "{d}/requests.csv", "row 3, field 'total_ms'",
      "expected a finite number", change=(R, "1.5,13.5", "1.5,nan"), needs=ORT),
    # ---- inspect (roles missing per exporter: test_decoder_signature.py, test_thirdparty_decoders.py)
    C("inspect", "missing-file", "inspect {d}/none.onnx", "{d}/none.onnx: file not found", "expected an ONNX model"),
    C("inspect", "not-a-decoder", "inspect {d}/plan.yaml", "{d}/plan.yaml", "not a readable ONNX model", needs=ORT),
    C("inspect", "bad-io", "inspect {d}/model.onnx --io inputs_embeds=words", "field '--io'", "expected NAME=ROLE pairs",
      needs=ORT),
    C("inspect", "io-unknown-name", "inspect {d}/model.onnx --io nothing=input_ids", "{d}/model.onnx",
      "field '--io'", "got 'nothing'", needs=ORT),
    C("inspect", "past-len-too-long", "inspect {d}/model.onnx --past-len 100000", "{d}/model.onnx",
      "field '--past-len'", "got 100000", needs=ORT),
    C("inspect", "shared-on-concat", "inspect {d}/model.onnx --kv-mode shared", "{d}/model.onnx",
      "field '--kv-mode'", "GroupQueryAttention", needs=ORT),
    C("loadtest", "bad-backend", LT + " --backend bogus", "field 'backend'", "expected one of auto, ort-cpu",
      "got 'bogus'", needs=ORT),
    C("loadtest", "bad-alpha", "loadtest -c {d}/calibration.yaml --alpha 2", "--alpha must be in (0, 1)", code=2),
    C("loadtest", "zero-window", "loadtest -c {d}/calibration.yaml --window 0", "--window must be >= 1", code=2),
    C("loadtest", "min-observations", "loadtest -c {d}/calibration.yaml --min-observations 9",
      "--min-observations must be in 1 .. --window (8)", code=2),
    C("loadtest", "usage", "loadtest -c {d}/calibration.yaml --requests x",
      "argument --requests: invalid int value: 'x'", code=2),
    # ---- serve (bad request bodies, 429, SIGTERM: test_serve_http.py)
    C("serve", "missing-file", "serve -c {d}/none.yaml", "{d}/none.yaml: file not found", needs=("fastapi",)),
    C("serve", "malformed-yaml", "serve -c {d}/calibration.yaml", "{d}/calibration.yaml: malformed YAML at line 3",
      change=(K, None, BAD_YAML), needs=("fastapi",)),
    C("serve", "missing-onnx", "serve -c {d}/calibration.yaml --onnx {d}/none.onnx", "{d}/none.onnx: model not found",
      needs=("fastapi",)),
    C("serve", "missing-tokenizer", "serve -c {d}/calibration.yaml --onnx {d}/model.onnx --tokenizer {d}/none",
      "{d}/none: field '--tokenizer': tokenizer not found", needs=(*ORT, "fastapi")),
    C("serve", "max-batch", "serve -c {d}/calibration.yaml --max-batch 0", "--max-batch must be >= 1", code=2),
    C("serve", "factor-max", "serve -c {d}/calibration.yaml --factor-max 0.9", "--factor-max must be a number > 1",
      code=2),
    C("serve", "warm-up-steps", "serve -c {d}/calibration.yaml --warm-up-steps -1", "--warm-up-steps must be >= 0",
      code=2),
    C("serve", "alpha-step", "serve -c {d}/calibration.yaml --alpha-step 2", "--alpha-step must be a number in [0, 1]",
      code=2),
    C("calibrate", "replay-processes", "calibrate --onnx {d}/model.onnx --replay-processes -1",
      "field '--replay-processes'", "an integer >= 0", needs=ORT),
    C("serve", "engine", "serve -c {d}/calibration.yaml --engine {d}/x.plan", "{d}/x.plan: field '--engine': file not found",
      "a serialized TensorRT engine"),
]


def _apply(case: Case, src: Path, dst: Path) -> None:
    for item in src.iterdir():
        shutil.copy(item, dst / item.name)
    if case.change is None:
        return
    name, old, new = case.change
    if old is None:
        (dst / name).write_text(new)
        return
    text = (dst / name).read_text()
    if isinstance(old, re.Pattern):
        changed = old.sub(new, text, count=1)
    else:
        changed = text.replace(old, new, 1)
    assert changed != text, f"{name}: {old!r} not found, the case would test nothing"
    (dst / name).write_text(changed)


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse usage errors
        return int(exc.code or 0)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.known_bug, strict=True)] if c.known_bug else [])
    for c in CASES
])
def test_bad_input(case: Case, valid_inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for module in case.needs:
        pytest.importorskip(module)
    _apply(case, valid_inputs, tmp_path)
    argv = [a.replace("{d}", str(tmp_path)) for a in case.argv]
    capsys.readouterr()
    code = _run(argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    # argparse prints its usage line(s) first; the error itself is always the last line, and alone for exit 1.
    assert lines and (len(lines) == 1 or case.code == 2), err
    line = lines[-1]
    assert line.startswith(f"trt-latency {case.verb}: error: "), line
    for needle in case.needles:
        assert needle.replace("{d}", str(tmp_path)) in line, f"{needle!r} not in {line!r}"


def test_every_verb_has_cases() -> None:
    from trt_latency.cli import VERBS

    assert {c.verb for c in CASES} == set(VERBS)


def test_admit_unknown_tier_rejects(valid_inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """admit is the serving decision: a config the calibration lacks is a REJECT saying why (exit 0), not an error."""
    capsys.readouterr()
    assert main(["admit", "-c", str(valid_inputs / "calibration.yaml"), *ADMIT.split(), "--tier", "9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("REJECT: max_new_tokens 0") and "unknown config" in out


def test_debug_shows_the_traceback(valid_inputs: Path) -> None:
    """--debug re-raises the same error instead of the one line."""
    from trt_latency.errors import CalibrationError

    with pytest.raises(CalibrationError, match="file not found"):
        main(["--debug", "bench", "-c", str(valid_inputs / "none.yaml")])
