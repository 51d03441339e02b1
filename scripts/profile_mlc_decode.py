"""Per-kernel profile of the compiled model's decode step: where a token's time goes.

Every packed-function call the Relax VM makes during ``decode`` is timed through
``VirtualMachine.set_instrument`` (TVM's hook before and after each call). For each kernel it
prints the milliseconds per token, its share of the timed kernel total, the bytes its arguments
hold (for a GEMV: the packed weights and scales it streams) and the bandwidth that implies, next
to the machine's STREAM triad (``harness.env``). The hook is a Python callback around each of
the ~3,000 calls of a step: it inflates every call's time (most for the tiny VM builtins), so the
shares locate the time while the absolute times are upper bounds; the host overhead of the VM
loop cannot be had by subtraction from them and is not reported.

    python scripts/profile_mlc_decode.py --model smollm2-135m --variant q4f16_1 --prompt 128 --steps 32

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--variant", default="q4f16_1")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens prefilled first")
    parser.add_argument("--steps", type=int, default=32, help="decode steps measured")
    parser.add_argument("--threads", type=int, default=0, help="0: physical cores")
    args = parser.parse_args()

    from backends.base import backend_class
    from backends.models import resolve_model
    from harness.env import memory_bandwidth

    options = {"threads": args.threads} if args.threads else {}
    backend = backend_class("mlc")(args.variant, options)
    backend.load(resolve_model(args.model, args.random_weights))
    session = backend.session
    prompt = [(7 * i + 11) % 1000 + 10 for i in range(args.prompt)]

    def run(steps: int, instrument=None) -> list[float]:
        kv = session.cache(1, -(-(args.prompt + steps + 1) // 16) * 16 + 64)
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

    run(4)  # warm-up
    plain = run(args.steps)
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

    instrumented = run(args.steps, instrument)
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
