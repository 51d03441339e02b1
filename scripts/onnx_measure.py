"""Measure the ONNX backend on SmolLM2-135M against hf:fp32 in one process (docs/backends/onnx.md).

Perplexity: the first 1024 tokens of WikiText-2 test (tokenized without special tokens) scored as
one window with no context (PPL = exp(-mean log p)). Latency: greedy generation of ``--new`` tokens
from the first ``--prompt`` tokens of the same text, batch 1, ``--reps`` runs after one warm-up;
TTFT = first step - start, decode tokens/s = (n - 1) / (last step - first step). Backends run one
after another in this process with the same thread count, so ratios between rows are meaningful
even on a shared CPU; absolute numbers are noisy.

Usage: python scripts/onnx_measure.py [--int8-study] [--variants fp32,int8,int4,int4@int4_algorithm=hqq]
       [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import ScoringWindow, backend_class  # noqa: E402
from backends.models import load_tokenizer, resolve_model  # noqa: E402


def wikitext_ids(spec, n: int) -> list[int]:
    data = Path(os.environ.get("HARNESS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    text = (data / "wikitext-2-raw-v1" / "test.txt").read_text()
    return load_tokenizer(spec)(text, add_special_tokens=False)["input_ids"][:n]


def measure(backend, spec, window, prompt, new, reps) -> dict:
    load = backend.load(spec)
    row = {"label": backend.label, "load_s": round(load.load_s, 2), "weight_bytes": load.weight_bytes}
    row.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in load.extra.items()
                if k in ("export_s", "quantize_s", "artifact_bytes", "folded_weight_bytes", "cache_hit",
                         "provider", "threads")})
    logprobs = backend.loglikelihood([ScoringWindow(tuple(window), 0)])[0]
    row["ppl"] = round(float(np.exp(-logprobs.mean())), 4)
    backend.generate([prompt], new, min_new_tokens=new)  # warm-up
    ttft, tps = [], []
    for _ in range(reps):
        out = backend.generate([prompt], new, min_new_tokens=new)
        ttft.append((out.step_times_s[0] - out.start_s) * 1000)
        tps.append((out.n_steps - 1) / (out.step_times_s[-1] - out.step_times_s[0]))
    row["ttft_ms"] = round(statistics.median(ttft), 1)
    row["decode_tok_s"] = round(statistics.median(tps), 1)
    row["rss"] = backend.memory()["rss"]
    backend.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="fp32,int8,int4")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--int8-study", action="store_true",
                        help="perplexity of int8 per-tensor/per-channel x exclusion options only")
    args = parser.parse_args()
    spec = resolve_model("smollm2-135m")
    window = wikitext_ids(spec, 1024)
    prompt = window[: args.prompt]
    options = {"threads": args.threads} if args.threads else {}
    onnx = backend_class("onnx")
    if args.int8_study:
        for per_channel in (False, True):
            for exclude in ("none", "/mlp/down_proj/", "/layers.0/;/layers.29/",
                            "default"):
                backend = onnx("int8", {**options, "int8_per_channel": per_channel, "int8_exclude": exclude})
                load = backend.load(spec)
                lp = backend.loglikelihood([ScoringWindow(tuple(window), 0)])[0]
                print(json.dumps({"per_channel": per_channel, "exclude": exclude,
                                  "ppl": round(float(np.exp(-lp.mean())), 3),
                                  "weight_bytes": load.weight_bytes,
                                  "artifact_bytes": load.extra["artifact_bytes"],
                                  "quantize_s": round(load.extra["quantize_s"], 1)}), flush=True)
                backend.close()
        return
    if not args.no_hf:
        print(json.dumps(measure(backend_class("hf")("fp32", options), spec, window, prompt, args.new, args.reps)), flush=True)
    for item in args.variants.split(","):  # e.g. "int4" or "int4@int4_algorithm=hqq"
        variant, *settings = item.split("@")
        extra = dict(s.split("=", 1) for s in settings)
        row = measure(onnx(variant, {**options, **extra}), spec, window, prompt, args.new, args.reps)
        print(json.dumps({**row, "options": extra} if extra else row), flush=True)


if __name__ == "__main__":
    main()
