"""Measure ``mlc`` variants against ``hf:fp32`` in one process (so ratios share the machine state).

    python -m backends.mlc.compare --model smollm2-135m --variants q0f32,q4f16_1 [--data-dir DIR]

For each backend: greedy agreement with ``hf:fp32`` on a fixed prompt (token for token), prefill
throughput (tokens/s, one ``prompt_len``-token prompt, 1 new token), decode
throughput (tokens/s over ``new_tokens`` steps after a 128-token prompt: (n-1) / (t_last - t_first),
median of ``--repeats``, all backends loaded at once and timed in turn) and, given the shared data, perplexity on the first 1024 WikiText-2 test
tokens (one window, n_context 0: PPL = exp(-mean logprob)). Timings on a shared CPU are noisy:
compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from backends.base import ScoringWindow, backend_class
from backends.models import load_tokenizer, resolve_model

PROMPT = "The history of the city begins in the Middle Ages, when"


def measure_once(backend, long_prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """``(prefill tokens/s, decode tokens/s)`` from one prefill-only run and one decode run."""
    out = backend.generate([long_prompt], 1, min_new_tokens=1)
    prefill = len(long_prompt) / (out.step_times_s[0] - out.start_s)
    out = backend.generate([long_prompt[:128]], new_tokens, min_new_tokens=new_tokens)
    t = out.step_times_s
    return prefill, (len(t) - 1) / (t[-1] - t[0])


def fake_quant_ppl(spec, mode_name: str, window: ScoringWindow, embeddings: bool) -> float:
    """Perplexity of transformers fp32 with weights replaced by ``quant.fake_quantize`` (numpy
    reference), to tell the format's cost from the compiled kernels' (linear layers, and the
    embedding / tied lm_head when ``embeddings``)."""
    import torch

    from backends.mlc.quant import MODES, fake_quantize

    backend = backend_class("hf")("fp32", {"device": "cpu"})
    backend.load(spec)
    kinds = (torch.nn.Linear, torch.nn.Embedding) if embeddings else (torch.nn.Linear,)
    with torch.no_grad():
        for name, module in backend.model.named_modules():
            if isinstance(module, kinds) and (embeddings or name != "lm_head"):
                module.weight.copy_(torch.from_numpy(fake_quantize(module.weight.numpy(), MODES[mode_name])))
    ppl = float(np.exp(-backend.loglikelihood([window])[0].mean()))
    backend.close()
    return ppl


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default="q0f32,q4f32_1,q4f16_1,q3f16_1,q8f16_1")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--option", action="append", default=[], help="mlc option key=value")
    parser.add_argument("--fake-quant", default="", help="modes whose transformers fake-quantized "
                        "perplexity to report (needs --data-dir), then exit")
    args = parser.parse_args(argv)
    spec = resolve_model(args.model)
    tokenizer = load_tokenizer(spec)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    window = None
    if args.data_dir:
        text = (Path(args.data_dir) / "wikitext-2-raw-v1" / "test.txt").read_text()
        window = ScoringWindow(tuple(tokenizer(text, add_special_tokens=False)["input_ids"][:1024]), 0)
    if args.fake_quant and window is not None:
        for mode_name in args.fake_quant.split(","):
            for embeddings in (False, True):
                print(f"hf-fake-quant {mode_name} {'linear+embedding' if embeddings else 'linear only'}: "
                      f"ppl={fake_quant_ppl(spec, mode_name, window, embeddings):.3f}", flush=True)
        return
    options = dict(kv.split("=", 1) for kv in args.option)
    long_prompt = [prompt[i % len(prompt)] for i in range(args.prompt_len)]
    rows, backends = {}, {}
    reference = None
    for name, variant in [("hf", "fp32")] + [("mlc", v) for v in args.variants.split(",") if v]:
        backend = backend_class(name)(variant, options if name == "mlc" else {})
        report = backend.load(spec)
        greedy = backend.generate([prompt], 32, min_new_tokens=32).token_ids[0]
        reference = reference or greedy
        row = {"load_s": report.load_s, "weight_bytes": report.weight_bytes, **report.extra,
               "greedy_equal_hf": greedy == reference,
               "greedy_prefix_equal": next((i for i, (a, b) in enumerate(zip(greedy, reference)) if a != b), len(greedy))}
        if window is not None:
            t0 = time.perf_counter()
            lp = backend.loglikelihood([window])[0]
            row["ppl"] = float(np.exp(-lp.mean()))
            row["ppl_s"] = time.perf_counter() - t0
        backend.generate([long_prompt[:16]], 4, min_new_tokens=4)  # warm-up
        rows[backend.label], backends[backend.label] = row, backend
    # timings interleaved across backends, so that load changes hit every row alike
    samples = {label: ([], []) for label in rows}
    for _ in range(args.repeats):
        for label, backend in backends.items():
            prefill, decode = measure_once(backend, long_prompt, args.new_tokens)
            samples[label][0].append(prefill)
            samples[label][1].append(decode)
    for label, row in rows.items():
        row["prefill_tok_s"] = statistics.median(samples[label][0])
        row["decode_tok_s"] = statistics.median(samples[label][1])
        print(label, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                 if k != "artifact_dir"}), flush=True)
    base = rows["hf:fp32"]
    for label, row in rows.items():
        print(f"{label:14s} ppl={row.get('ppl', float('nan')):.3f} prefill={row['prefill_tok_s']:.1f} tok/s "
              f"decode={row['decode_tok_s']:.1f} tok/s (x{row['decode_tok_s'] / base['decode_tok_s']:.2f} of hf) "
              f"greedy_equal={row['greedy_equal_hf']}")


if __name__ == "__main__":
    main()
