"""Per-kernel profile of the compiled model's decode step: where a token's time goes.

Every packed-function call the Relax VM makes during ``decode`` is timed through
``VirtualMachine.set_instrument`` (TVM's hook before and after each call). For each kernel it
prints the milliseconds per token, its share of the timed kernel total, the bytes its arguments
hold (for a GEMV: the packed weights and scales it streams) and the bandwidth that implies, next
to the machine's STREAM triad (``harness.env``). The hook is a Python callback around each of
the ~3,000 calls of a step: it inflates every call's time (most for the tiny VM builtins), so the
shares locate the time while the absolute times are upper bounds; the host overhead of the VM
loop cannot be had by subtraction from them.

The host overhead is bounded instead with a shrunk twin (``--host-overhead``): the same
architecture (every layer, attention head and KV head, so the same VM program, the same
~3,000 calls and the same paged KV cache), with head_dim 32, intermediate size 32 and a 256-token
vocabulary, built with random weights and the same variant and threads. Its kernels do ~1/30 of
the work, so its decode step (VM loop + kernel launches + that residue) is an upper bound on the
VM's per-step host cost, reported as a share of the real model's step.

    python scripts/profile_mlc_decode.py --model smollm2-135m --variant q4f16_1 --prompt 128 --steps 32
    python scripts/profile_mlc_decode.py --model smollm2-135m --variant q4f16_1 --host-overhead

Numbers are per decode step at batch 1, after the prompt's prefill; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _nbytes(value) -> int:
    import numpy as np

    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return 0
    try:
        return int(np.prod([int(d) for d in shape])) * np.dtype(str(dtype)).itemsize
    except TypeError:
        return 0


def timed_decode(session, prompt: list[int], steps: int, instrument=None) -> list[float]:
    """Prefill ``prompt`` into a fresh paged KV cache, then time ``steps`` greedy decode steps
    (seconds each, ``time.perf_counter`` around ``session.decode``); ``instrument``: a
    ``VirtualMachine.set_instrument`` callback around the decode calls only."""
    kv = session.cache(1, -(-(len(prompt) + steps + 1) // 16) * 16 + 64)
    session.add_sequence(kv, 0)
    try:
        session.prefill(kv, {0: prompt})
        token, times = 1, []
        for _ in range(steps):
            if instrument is not None:
                session.vm.set_instrument(instrument)
            started = time.perf_counter()
            logits = session.decode(kv, {0: token})[0]
            times.append(time.perf_counter() - started)
            if instrument is not None:
                session.vm.set_instrument(None)
            token = int(logits.argmax())
        return times
    finally:
        session.remove_sequence(kv, 0)


TWIN_HEAD_DIM, TWIN_INTERMEDIATE, TWIN_VOCAB = 32, 32, 256  # 32: the q*_1 group size divides every matrix


def shrunk_twin(config_path: Path, workdir: Path):
    """A random-weight ``ModelSpec`` with the architecture of ``config_path`` (a transformers
    Llama ``config.json``): same layers, attention heads and KV heads, so the same compiled VM
    program and call count, but head_dim 32, intermediate 32 and a 256-token vocabulary."""
    import json

    from backends.models import ModelSpec

    config = json.loads(Path(config_path).read_text())
    heads = config["num_attention_heads"]
    config.update(head_dim=TWIN_HEAD_DIM, hidden_size=heads * TWIN_HEAD_DIM, intermediate_size=TWIN_INTERMEDIATE,
                  vocab_size=TWIN_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    path = workdir / "config.json"
    path.write_text(json.dumps(config, indent=1))
    return ModelSpec("shrunk-twin", "random", str(path), None, ("host-overhead twin",))


def host_overhead(spec, variant: str, options: dict, prompt: list[int], steps: int) -> float:
    """Median decode step (seconds) of ``spec``'s shrunk twin (``shrunk_twin``), built in a
    temporary cache that is deleted afterwards."""
    import os
    import tempfile
    from unittest import mock

    from backends.base import backend_class
    from backends.models import checkpoint_dir

    config = Path(spec.location) if spec.random_weights else checkpoint_dir(spec) / "config.json"
    with tempfile.TemporaryDirectory() as workdir, \
            mock.patch.dict(os.environ, {"QUANTARENA_CACHE": str(Path(workdir) / "cache")}):  # nothing stays
        twin = backend_class("mlc")(variant, options)
        twin.load(shrunk_twin(config, Path(workdir)))
        try:
            timed_decode(twin.session, prompt, 4)  # warm-up
            return statistics.median(timed_decode(twin.session, prompt, steps))
        finally:
            twin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--variant", default="q4f16_1")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens prefilled first")
    parser.add_argument("--steps", type=int, default=32, help="decode steps measured")
    parser.add_argument("--threads", type=int, default=0, help="0: physical cores")
    parser.add_argument("--host-overhead", action="store_true",
                        help="also time the shrunk twin's decode step (an upper bound on the VM's host cost)")
    args = parser.parse_args()

    from backends.base import backend_class
    from backends.models import resolve_model
    from harness.env import memory_bandwidth

    options = {"threads": args.threads} if args.threads else {}
    spec = resolve_model(args.model, args.random_weights)
    backend = backend_class("mlc")(args.variant, options)
    backend.load(spec)
    session = backend.session
    prompt = [(7 * i + 11) % 200 + 10 for i in range(args.prompt)]  # ids every vocabulary has

    timed_decode(session, prompt, 4)  # warm-up
    plain = timed_decode(session, prompt, args.steps)
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    arg_bytes: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            arg_bytes[symbol] += sum(_nbytes(a) for a in call_args)
            started[symbol] = time.perf_counter()
        else:
            seconds[symbol] += time.perf_counter() - started.pop(symbol)
            calls[symbol] += 1
        return 0

    instrumented = timed_decode(session, prompt, args.steps, instrument)
    step_ms = statistics.median(plain) * 1e3
    kernels_ms = sum(seconds.values()) / args.steps * 1e3
    bandwidth = memory_bandwidth(threads=backend.threads)["bytes_s"]
    print(f"mlc:{args.variant} on {args.model}, {backend.threads} threads, prompt {args.prompt}, "
          f"{args.steps} decode steps")
    print(f"decode step: {step_ms:.2f} ms median ({1e3 / step_ms:.1f} tok/s) without instrumentation, "
          f"{statistics.median(instrumented) * 1e3:.2f} ms with it")
    print(f"timed calls: {kernels_ms:.2f} ms per token (each inflated by the callback: shares, not absolute "
          "times, are the profile)")
    print(f"STREAM triad: {bandwidth / 1e9:.1f} GB/s")
    if args.host_overhead:
        twin_ms = host_overhead(spec, args.variant, options, prompt, args.steps) * 1e3
        print(f"host overhead bound: the shrunk twin's decode step is {twin_ms:.3f} ms = "
              f"{100 * twin_ms / step_ms:.1f}% of the step (VM loop + kernel launches + ~1/30 of the work)")
    print(f"{'kernel':48s} {'calls/tok':>9s} {'ms/tok':>8s} {'share':>6s} {'MB/tok':>8s} {'GB/s':>6s}")
    for symbol in sorted(seconds, key=seconds.get, reverse=True):
        ms = seconds[symbol] / args.steps * 1e3
        mb = arg_bytes[symbol] / args.steps / 1e6
        rate = arg_bytes[symbol] / seconds[symbol] / 1e9 if seconds[symbol] else 0.0
        print(f"{symbol[:48]:48s} {calls[symbol] / args.steps:9.1f} {ms:8.3f} {100 * ms / kernels_ms:5.1f}% "
              f"{mb:8.2f} {rate:6.1f}")
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
