"""The mlc backend's CUDA path on a lent GPU: cross-compile here, check and time there.

The GPU machine this project is sometimes lent (the workplace's ``device`` tool) cannot reach a
package index or the Hub, and only 64 MiB travel with a call: not TVM's 260 MB compiler, not
SmolLM2's weights. So the work is split in three:

``bundle`` (CPU machine): TVM's Python package without its compiler library (``tvm-runtime.tgz``,
~4 MB) and the wheels the run needs that the GPU image lacks (tvm-ffi, pydantic), for Python 3.12.

``build`` (CPU machine; neither a GPU nor nvcc is needed): ``build_model`` compiled for ``cuda`` exactly as
``MLCBackend.prepare`` does (``make_target`` with ``QUANTARENA_CUDA_ARCH``, ``compile_module``:
TVM's CUDA pipeline with dlight's GPU rules); ``lib.so`` and a ``meta.json`` with the parameter
names, shapes and dtypes, per model and variant. TVM 0.27 keeps the CUDA kernels as source in
``lib.so`` and compiles them when it is loaded (``tvm_callback_cuda_compile``).

``run`` (GPU machine, ``scripts/mlc_cuda_device.sh``; TVM's runtime alone):

* correctness (``build --weights convert``, small models): seeded random transformers weights
  (the model's shipped config) are converted with ``convert.iter_params``; the compiled model's
  logits over a 128-token prompt are compared with transformers on the same GPU, fp32 (the
  reference) and fp16, both with the variant's weights (``quant.fake_quantize``), as relative L2
  error and top-1 agreement;
* latency (``runtime.Session.generate``, the latency workload's protocol: one 512-token prompt,
  64 new tokens, medians of the repetitions after warm-ups): TTFT, TPOT, prefill and decode
  tokens/s (``workloads.metrics.generation_timings``); transformers fp16 eager (``generate``) on
  the same GPU and weights for comparison;
* the decode roofline: bytes a decode step must read (every parameter once + the KV cache at the
  mean context) times decode tokens/s, next to the GPU's copy bandwidth measured in the same run
  (a 1 GiB device-to-device copy, bytes read + written, as STREAM counts), and the
  packed-function calls per step (``VirtualMachine.set_instrument``): kernel launches and VM
  builtins, which bound a step from below when bytes do not.

Large models (``build --weights packed``) skip transformers: their parameters are drawn in the
stored format (random 4-bit codes, scales around 0.02/7, unit norms), speed-only like the
harness's ``--random-weights``.

    python scripts/mlc_cuda.py bundle --out .gpu                   # .gpu/ in .git/info/exclude
    python scripts/mlc_cuda.py build --model smollm2-135m --variants q4f16_1,q0f16 --out .gpu/build
    python scripts/mlc_cuda.py build --model llama3-8b --variants q4f16_1,q0f16 --weights packed --out .gpu/build
    # device tool, carry [".gpu"]:  bash scripts/mlc_cuda_device.sh
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = Path(__file__).resolve().parents[1] / "backends" / "configs"


def compute_dtype(variant: str) -> str:
    """The activation / KV-cache dtype of ``variant`` on CUDA (``MLCBackend.compute_dtype``)."""
    from backends.mlc.backend import MLCBackend

    return MLCBackend(variant, {"device": "cuda"}).compute_dtype


# --- build (CPU machine) -----------------------------------------------------------------------
def build(model: str, variants: list[str], arch: str, out: Path, weights: str) -> None:
    """Cross-compile ``model`` (a ``backends/configs`` name) for ``cuda`` ``arch`` per variant into
    ``out/<model>-<variant>/{lib.so,meta.json}``; ``weights`` (``convert`` or ``packed``) is how
    ``run`` makes its parameters."""
    os.environ["QUANTARENA_CUDA_ARCH"] = arch
    from backends.mlc.compile import compile_module, make_target
    from backends.mlc.model import LlamaConfig, build_model, export_spec
    from backends.mlc.quant import MODES

    config = json.loads((CONFIGS / f"{model}.json").read_text())
    cfg = LlamaConfig.from_hf(config)
    target = make_target("cuda")
    for variant in variants:
        mode, dtype = MODES[variant], compute_dtype(variant)
        t0 = time.perf_counter()
        with target:
            mod, named = build_model(cfg, mode, dtype, mode, 0).export_tvm(export_spec(dtype))
        executable = compile_module(mod, target, fast_attention=False)
        entry = out / f"{model}-{variant}"
        entry.mkdir(parents=True, exist_ok=True)
        executable.export_library(str(entry / "lib.so"))
        meta = {"model": model, "variant": variant, "dtype": dtype, "target": str(target),
                "compile_s": time.perf_counter() - t0, "config": config, "weights": weights,
                "params": [[n, [int(d) for d in p.shape], str(p.dtype)] for n, p in named]}
        (entry / "meta.json").write_text(json.dumps(meta))
        print(f"{entry.name}: {meta['compile_s']:.1f} s, lib.so {(entry / 'lib.so').stat().st_size / 1e6:.1f} MB")


def bundle(out: Path) -> None:
    """``out/tvm-runtime.tgz`` (the installed ``tvm`` package without ``libtvm_compiler.so``
    and its vendored sources) and ``out/whl/`` (the run's wheels missing on the GPU image,
    for CPython 3.12 on x86-64)."""
    import tarfile

    import tvm
    from gpu_harness_bundle import download_cp312, pinned  # scripts/ is on the path of a script run

    package = Path(tvm.__file__).parent
    skipped = {"3rdparty", "src", "web", "__pycache__", "libtvm_compiler.so"}
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "tvm-runtime.tgz", "w:gz") as tar:
        tar.add(package, arcname="tvm", filter=lambda info: None if Path(info.name).name in skipped else info)
    download_cp312([pinned(name) for name in
                    ("apache-tvm-ffi", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")],
                   out / "whl")


# --- run (GPU machine) -------------------------------------------------------------------------
def copy_bandwidth_gb_s() -> float:
    """Device-to-device copy of 1 GiB, (read + written bytes) / median time over 20 copies, GB/s."""
    import torch

    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(stop) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def random_checkpoint(config: dict, directory: Path, seed: int):
    """A transformers Llama with seeded random weights (its own initializer), saved to
    ``directory`` as safetensors; returns the fp32 model on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "torch_dtype"})).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def with_variant_weights(model, variant: str):
    """A copy of ``model`` whose linear and embedding weights are what ``variant`` computes with
    (``quant.fake_quantize``); the model itself for unquantized variants."""
    import copy

    import torch

    from backends.mlc.quant import MODES, fake_quantize

    mode = MODES[variant]
    if not mode.quantized:
        return model
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.from_numpy(fake_quantize(module.weight.numpy(), mode)))
    return twin


def packed_params(meta: dict, seed: int):
    """Random parameters in the stored format of ``meta["params"]``: uniform 4-bit codes in the
    uint32 words, scales uniform in [0.5, 1.5] x 0.02/7 (weights of std ~0.013), unit norm weights,
    fp16 weights a block of 2^20 normals (std 0.02) repeated. Speed-only, one array at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for name, shape, dtype in meta["params"]:
        if dtype == "uint32":
            yield rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)
        elif name.endswith("q_scale"):
            yield (rng.uniform(0.5, 1.5, size=shape) * 0.02 / 7).astype(dtype)
        elif "norm" in name:
            yield np.ones(shape, dtype=dtype)
        else:  # a random block repeated: drawing 8e9 normals would take minutes
            yield np.resize((rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).astype(dtype), shape)


def session_for(entry: Path, meta: dict, params):
    """A ``runtime.Session`` on ``cuda`` over ``entry/lib.so`` with ``params`` (the backend's
    default KV options)."""
    import numpy as np
    import tvm

    from backends.kv import kv_bytes_per_token
    from backends.mlc.model import LlamaConfig
    from backends.mlc.runtime import KVOptions, Session

    cfg = LlamaConfig.from_hf(meta["config"])
    kv = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                            np.dtype(meta["dtype"]).itemsize)
    t0 = time.perf_counter()
    library = tvm.runtime.load_module(str(entry / "lib.so"))  # compiles the CUDA kernels (above)
    load_s = time.perf_counter() - t0
    return Session(library, params, "cuda", KVOptions(), kv), kv, load_s


def rel_error(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_logits(session, model, variant: str, vocab: int, seed: int) -> dict:
    """The compiled model's logits for a 128-token random prompt vs transformers on the GPU
    (fp32 = reference; fp16 for scale), both with the variant's weights."""
    import copy

    import numpy as np
    import torch

    ids = np.random.default_rng(seed).integers(0, vocab, size=128).tolist()
    ours = session.score_logits(ids, 1)  # rows predict tokens 1..127, i.e. positions 0..126
    ref_model = with_variant_weights(model, variant)
    refs = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        m = copy.deepcopy(ref_model).to("cuda", dtype)  # a copy: the fp32 weights stay exact
        with torch.no_grad():
            refs[name] = m(torch.tensor([ids], device="cuda")).logits[0, :-1].float().cpu().numpy()
        del m
    top1 = lambda a, b: float(np.mean(a.argmax(-1) == b.argmax(-1)))  # noqa: E731
    return {"rel_err_vs_torch_fp32": rel_error(ours, refs["fp32"]),
            "torch_fp16_rel_err_vs_fp32": rel_error(refs["fp16"], refs["fp32"]),
            "top1_vs_torch_fp32": top1(ours, refs["fp32"]),
            "torch_fp16_top1_vs_fp32": top1(refs["fp16"], refs["fp32"])}


def time_generation(generate, n_in: int, warmup: int, repetitions: int) -> dict:
    """Median ``generation_timings`` over ``repetitions`` runs of ``generate() -> (start_s, step_times_s)``."""
    from workloads.metrics import generation_timings

    runs = []
    for i in range(warmup + repetitions):
        start, steps = generate()
        if i >= warmup:
            runs.append(generation_timings(start, steps, n_in))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def time_mlc(session, vocab: int, n_in: int, n_out: int, warmup: int, repetitions: int, seed: int) -> dict:
    """``time_generation`` of ``session.generate`` on one random ``n_in``-token prompt, exactly
    ``n_out`` new tokens (greedy)."""
    import numpy as np

    from backends.base import GenerationRequest

    prompt = tuple(int(t) for t in np.random.default_rng(seed).integers(0, vocab, size=n_in))

    def generate():
        out = session.generate(GenerationRequest((prompt,), n_out, n_out), [])
        return out.start_s, out.step_times_s

    return time_generation(generate, n_in, warmup, repetitions)


def time_torch(model, vocab: int, n_in: int, n_out: int, warmup: int, repetitions: int, seed: int) -> dict:
    """transformers ``generate`` (greedy, fp16, eager, dynamic KV cache) on the GPU, timed by a
    streamer-free protocol: TTFT = a 1-token generate; decode from the n_out-token generate."""
    import numpy as np
    import torch

    prompt = torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, size=(1, n_in))).to("cuda")

    def generate():
        stamps = []
        start = time.perf_counter()
        with torch.no_grad():
            for n in (1, n_out):
                model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())
        ttft = stamps[0] - start
        decode = stamps[1] - stamps[0] - ttft  # the n_out run repeats the prefill
        step = decode / (n_out - 1)
        return start, [start + ttft + i * step for i in range(n_out)]

    return time_generation(generate, n_in, warmup, repetitions)


def calls_per_step(session) -> int:
    """Packed-function calls the VM makes in one decode step (kernels + builtins)."""
    counted = {"n": 0, "on": False}

    def instrument(func, name, before_run, ret, *args):
        if counted["on"] and before_run:
            counted["n"] += 1
        return 0

    session.vm.set_instrument(instrument)
    kv = session.cache(1, 256)
    session.add_sequence(kv, 7)
    session.prefill(kv, {7: list(range(16))})
    counted["on"] = True
    session.decode(kv, {7: 1})
    counted["on"] = False
    session.remove_sequence(kv, 7)
    session.vm.set_instrument(None)
    return counted["n"]


def gpu_random_model(config: dict, seed: int):
    """transformers' Llama for ``config`` initialised on the GPU (seeded), in fp16: the eager
    baseline for models whose weights are drawn in the packed format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "torch_dtype"}))
    return model.half().eval()


def cuda_runtime():
    """Load TVM's CUDA runtime sidecar (``lib/libtvm_runtime_cuda.so``) if needed and check the
    device. Runtime-only TVM skips it: the hook that loads it (``tvm.backend.cuda``) first imports
    compiler modules, fails, and the failure is swallowed."""
    import ctypes
    import types

    import tvm

    if not tvm.cuda(0).exist:
        ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    if not tvm.cuda(0).exist:
        raise SystemExit("TVM sees no CUDA device")
    # TVM 0.27 keeps CUDA kernels as source in lib.so and compiles them when the library is
    # loaded (tvm_callback_cuda_compile, NVRTC by default). That callback asks for the current
    # target scope, which runtime-only TVM lacks: with none, it reads the arch from the GPU.
    from tvm.support import nvcc

    if not hasattr(tvm.target._ffi_api, "TargetCurrent"):
        nvcc.Target = types.SimpleNamespace(current=lambda allow_none=True: None)
    if os.environ.get("TVM_CUDA_COMPILE_MODE") == "nvcc":  # its nvcc path also needs a pass context
        import tvm_ffi

        tvm_ffi.register_global_func("tvm_callback_cuda_compile", nvcc_fatbin, override=True)
    return tvm


def nvcc_fatbin(code: str) -> bytes:
    """The CUDA source compiled by ``nvcc --fatbin`` for this GPU, with TVM's own nvcc flags
    (``tvm.support.nvcc``), without the compiler-side state TVM's callback reads."""
    import subprocess
    import tempfile

    import tvm

    arch = tvm.cuda(0).compute_version.replace(".", "") + ("a" if float(tvm.cuda(0).compute_version) >= 9 else "")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        subprocess.run(["nvcc", "--fatbin", "-O3", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
                        *(f"-U__CUDA_NO_{t}__" for t in ("HALF_OPERATORS", "HALF_CONVERSIONS", "BFLOAT16_OPERATORS",
                                                         "BFLOAT16_CONVERSIONS", "BFLOAT162_OPERATORS",
                                                         "BFLOAT162_CONVERSIONS")),
                        "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
                        "-o", str(out), str(src)], check=True, capture_output=True)
        return out.read_bytes()


def run(directory: Path, out: Path, n_in: int, n_out: int, warmup: int, repetitions: int, seed: int,
        only: list[str] | None = None) -> None:
    """Check and time every ``directory/<model>-<variant>`` (those of ``only``); writes
    ``out/mlc_cuda.json`` after each and prints a table at the end."""
    import torch
    from backends.mlc.convert import iter_params
    from backends.mlc.model import LlamaConfig
    from backends.mlc.quant import MODES

    tvm = cuda_runtime()
    bandwidth = copy_bandwidth_gb_s()
    results = {"gpu": torch.cuda.get_device_name(0), "tvm": tvm.__version__, "torch": torch.__version__,
               "copy_bandwidth_gb_s": bandwidth, "n_in": n_in, "n_out": n_out,
               "warmup": warmup, "repetitions": repetitions, "runs": []}
    print(f"GPU {results['gpu']}: device-to-device copy {bandwidth:.0f} GB/s", flush=True)
    out.mkdir(parents=True, exist_ok=True)

    def save(row: dict) -> None:  # after every row: a run cut off at its time limit keeps the rest
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        (out / "mlc_cuda.json").write_text(json.dumps(results, indent=1))

    models: dict[str, object] = {}
    packed_configs: dict[str, dict] = {}
    for entry in sorted(p for p in directory.iterdir() if (p / "meta.json").is_file()):
        meta = json.loads((entry / "meta.json").read_text())
        if only and meta["model"] not in only:
            continue
        cfg = LlamaConfig.from_hf(meta["config"])
        variant, vocab = meta["variant"], cfg.vocab_size
        row = {"model": meta["model"], "variant": variant, "dtype": meta["dtype"], "compile_s": meta["compile_s"]}
        try:
            if meta.get("weights", "convert") == "convert":
                if meta["model"] not in models:
                    ckpt = Path("/tmp/ckpt") / meta["model"]
                    models[meta["model"]] = (random_checkpoint(meta["config"], ckpt, seed), ckpt)
                model, ckpt = models[meta["model"]]
                params = (value for _, value in iter_params(
                    ckpt, cfg, MODES[variant], meta["dtype"], [n for n, _, _ in meta["params"]], MODES[variant], 0))
            else:
                model, params = None, packed_params(meta, seed)
                packed_configs[meta["model"]] = meta["config"]
            print(f"{entry.name}: loading", flush=True)
            session, kv_per_token, row["library_load_s"] = session_for(entry, meta, params)
            print(f"{entry.name}: loaded in {row['library_load_s']:.1f} s", flush=True)
            row["param_bytes"] = session.param_bytes
            if model is not None:
                row["check"] = check_logits(session, model, variant, vocab, seed)
            print(f"{entry.name}: timing", flush=True)
            row["latency"] = time_mlc(session, vocab, n_in, n_out, warmup, repetitions, seed)
            row["calls_per_decode_step"] = calls_per_step(session)
            # a decode step reads every parameter once and the KV cache at its mean context
            step_bytes = session.param_bytes + kv_per_token * (n_in + n_out / 2)
            row["decode_bytes_per_step"] = step_bytes
            row["decode_gb_s"] = step_bytes * row["latency"]["decode_tok_s"] / 1e9
            row["roofline_tok_s"] = bandwidth * 1e9 / step_bytes
            del session
        except Exception as exc:  # one variant failing keeps the others' results
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"
        save(row)
    baselines = [(name, lambda model=model: model.to("cuda", torch.float16)) for name, (model, _) in models.items()]
    baselines += [(name, lambda config=config: gpu_random_model(config, seed)) for name, config in packed_configs.items()]
    for name, make in baselines:
        row = {"model": name, "variant": "transformers fp16 eager"}
        try:
            m = make()
            row["latency"] = time_torch(m, m.config.vocab_size, n_in, n_out, warmup, repetitions, seed)
            del m
            torch.cuda.empty_cache()
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"
        save(row)
    print(f"\n{'model':14} {'variant':24} {'TTFT ms':>8} {'TPOT ms':>8} {'prefill/s':>10} {'decode/s':>9} "
          f"{'GB/s':>6} {'roof/s':>7} {'calls':>6} rel.err(fp32) fp16-torch")
    for r in results["runs"]:
        lat = r.get("latency")
        if lat is None:
            print(f"{r['model']:14} {r['variant']:24} {r.get('error')}")
            continue
        c = r.get("check", {})
        print(f"{r['model']:14} {r['variant']:24} {lat['ttft_ms']:8.2f} {lat['tpot_ms']:8.3f} "
              f"{lat['prefill_tok_s']:10.0f} {lat['decode_tok_s']:9.1f} {r.get('decode_gb_s', float('nan')):6.0f} "
              f"{r.get('roofline_tok_s', float('nan')):7.0f} {r.get('calls_per_decode_step', 0):6d} "
              f"{c.get('rel_err_vs_torch_fp32', float('nan')):.2e} {c.get('torch_fp16_rel_err_vs_fp32', float('nan')):.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("bundle", help="TVM's runtime and the wheels the GPU machine lacks")
    k.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("build", help="cross-compile for cuda (CPU machine)")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--variants", default="q4f16_1,q0f16")
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--weights", choices=("convert", "packed"), default="convert",
                   help="run's weights: converted random transformers weights (checked) or packed random (speed only)")
    b.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="check and time the built libraries (GPU machine)")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--input-len", type=int, default=512)
    r.add_argument("--output-len", type=int, default=64)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--repetitions", type=int, default=5)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--only", default="", help="comma-separated model names (default: every built one)")
    args = parser.parse_args()
    if args.command == "bundle":
        bundle(args.out)
    elif args.command == "build":
        build(args.model, args.variants.split(","), args.arch, args.out, args.weights)
    else:
        run(args.dir, args.out, args.input_len, args.output_len, args.warmup, args.repetitions, args.seed,
            [m for m in args.only.split(",") if m])
    return 0


if __name__ == "__main__":
    sys.exit(main())
