"""KV memory vs context length: prefill a prompt of each length, decode, record cache size and speed.

``context_sweep`` is what the harness's ``--context-lengths`` option is meant to run per backend
row; ``python -m backends.kvq.sweep`` runs it standalone for the kvq variants and prints a table::

    python -m backends.kvq.sweep --model smollm2-135m --context-lengths 512,1024,2048,4096 \\
        --decode-tokens 32 --variants fp16,int8,int4,int2,hybrid --json sweep.json

One warm-up generation (2 tokens, the first length's prompt) is discarded; then per length one
measured generation of ``decode_tokens`` tokens (exact length, EOS suppressed) gives:

* ``kv_mb_prefill`` / ``kv_mb``: ``kv_cache_bytes_prefill`` / ``kv_cache_bytes`` in MiB (2**20);
* ``kv_fp16_analytic_mb``: ``2 x layers x kv_heads x head_dim x tokens x 2`` bytes in MiB;
* ``peak_rss_mb``: the process's peak resident set during the measured call (MiB; includes the
  weights), and ``peak_delta_mb``: that peak minus the RSS just before the call;
  ``peak_cuda_mb`` on CUDA (``torch.cuda.max_memory_allocated``);
* ``ttft_ms``: first token time minus call start (milliseconds);
* ``decode_tok_s``: ``(n - 1) / (t_last - t_first)`` tokens per second over the decode steps.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Sequence

MIB = 2**20


def prompt_tokens(spec, length: int, data_dir: Path | None) -> list[int]:
    """``length`` token ids: the start of WikiText-2 test text where ``data_dir`` has it (repeated
    if too short), else the tokenized sentence ``"The quick brown fox..."`` repeated.

    Raises:
        ValueError: ``length`` < 1.
    """
    from backends.models import load_tokenizer

    if length < 1:
        raise ValueError(f"context length must be >= 1, got {length}")
    tokenizer = load_tokenizer(spec)
    path = data_dir / "wikitext-2-raw-v1" / "test.txt" if data_dir else None
    if path is not None and path.is_file():
        with open(path) as handle:
            text = handle.read(max(20_000, length * 8))
    else:
        text = "The quick brown fox jumps over the lazy dog. "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def context_sweep(backend, spec, lengths: Sequence[int], decode_tokens: int, data_dir: Path | None = None) -> list[dict[str, Any]]:
    """Measure one loaded backend at each context length (see the module docstring for fields).

    Args:
        backend: a loaded transformers-based backend (its ``generate`` fills the KV keys).
        spec: the ``ModelSpec`` it loaded (for the tokenizer).
        lengths: prompt lengths in tokens.
        decode_tokens: tokens generated after each prompt (>= 2, for a decode rate).

    Returns:
        one dict per length, in order.

    Raises:
        ValueError: ``decode_tokens`` < 2.
    """
    from backends.memory import PeakMemorySampler, process_memory

    if decode_tokens < 2:
        raise ValueError("decode_tokens must be >= 2 to measure a decode rate")
    rows = []
    for index, length in enumerate(lengths):
        prompt = prompt_tokens(spec, length, data_dir)
        if index == 0:
            backend.generate([prompt], 2, min_new_tokens=2)  # warm-up, discarded
        before = process_memory()["rss"]
        with PeakMemorySampler() as sampler:
            out = backend.generate([prompt], decode_tokens, min_new_tokens=decode_tokens)
        peak = sampler.result()
        steps = out.step_times_s
        row = {
            "backend": backend.label,
            "context": length,
            "decode_tokens": len(steps),
            "kv_mb_prefill": out.extra["kv_cache_bytes_prefill"] / MIB,
            "kv_mb": out.extra["kv_cache_bytes"] / MIB,
            "kv_fp16_analytic_mb": out.extra["kv_cache_bytes_fp16_analytic"] / MIB,
            "kv_tokens": out.extra["kv_cache_tokens"],
            "kv_bytes_per_token_prefill": out.extra["kv_cache_bytes_prefill"] / out.extra["kv_cache_tokens_prefill"],
            "peak_rss_mb": peak["peak_rss"] / MIB,
            "peak_delta_mb": (peak["peak_rss"] - before) / MIB,
            "ttft_ms": (steps[0] - out.start_s) * 1e3,
            "decode_tok_s": (len(steps) - 1) / (steps[-1] - steps[0]),
        }
        if "peak_cuda_allocated" in peak:
            row["peak_cuda_mb"] = peak["peak_cuda_allocated"] / MIB
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a markdown table; the ratio column is the prefill KV size of the ``kvq:fp16`` row
    at the same context divided by this row's (compression vs the unquantized reference)."""
    reference = {r["context"]: r["kv_mb_prefill"] for r in rows if r["backend"] == "kvq:fp16"}
    lines = [
        "| backend | context | KV MB prefill | KV MB end | fp16 analytic MB | B/token | vs kvq:fp16 | peak RSS MB | TTFT ms | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = reference.get(r["context"])
        ratio_text = f"{ratio / r['kv_mb_prefill']:.2f}x" if ratio else "-"
        lines.append(
            f"| {r['backend']} | {r['context']} | {r['kv_mb_prefill']:.2f} | {r['kv_mb']:.2f} | "
            f"{r['kv_fp16_analytic_mb']:.2f} | {r['kv_bytes_per_token_prefill']:.0f} | {ratio_text} | "
            f"{r['peak_rss_mb']:.0f} | {r['ttft_ms']:.0f} | {r['decode_tok_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from backends.base import BackendError, backend_class
    from backends.models import ModelError, resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default="fp16,int8,int4,int2,hybrid")
    parser.add_argument("--context-lengths", default="512,1024,2048,4096")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--option", action="append", default=[], help="backend option key=value")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    try:
        lengths = [int(x) for x in args.context_lengths.split(",")]
        options = dict(item.split("=", 1) for item in args.option)
    except ValueError:
        parser.error("--context-lengths takes integers, --option takes key=value")
    data = os.environ.get("HARNESS_DATA_DIR")
    rows: list[dict[str, Any]] = []
    try:
        spec = resolve_model(args.model)
        for variant in args.variants.split(","):
            backend = backend_class("kvq")(variant, options)
            available = backend.availability(variant)
            if not available.ok:
                print(f"skip kvq:{variant}: {available.reason}")
                continue
            backend.load(spec)
            info = backend.info()
            new_rows = context_sweep(backend, spec, lengths, args.decode_tokens, Path(data) if data else None)
            for row in new_rows:
                row["attn_implementation"] = info["attn_implementation"]
            rows += new_rows
            backend.close()
            print(f"done kvq:{variant} (attention: {info['attn_implementation']})", flush=True)
            if args.json:  # rows so far, so an interrupted sweep keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1))
    except (BackendError, ModelError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
