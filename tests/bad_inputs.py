"""Every bad input the CLI can be given, one per flag and sweep-file key (a wrong type, a value out
of range, an unknown name), with a piece of the one-line message it must get. Used by
tests/test_bad_inputs.py (each exits 2 with that one line, before anything runs) and by
scripts/bad_inputs_table.py (the table in docs/reliability.md)."""

from __future__ import annotations

RUN = ["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--workloads", "latency", "--out", "OUT"]
SWEEP_HEAD = "model: tiny-llama\nbackends: [hf:fp32]\nworkloads: [latency]\n"

# (what is tried, argv with OUT for a fresh folder and SWEEP for a sweep file, the file's text or
# None, a piece of the message)
CASES: list[tuple[str, list[str], str | None, str]] = [
    # run: what and where
    ("--backends unknown", ["run", "--backends", "nope", "--out", "OUT"], None, "unknown backend 'nope'; choose from hf, bnb, onnx, kvq, mlc, llamacpp"),
    ("--backends unknown variant", ["run", "--backends", "hf:fp5", "--out", "OUT"], None, 'unknown variant hf:fp5; choose from hf:fp32, hf:bf16, hf:fp16'),
    ("--model unknown", ["run", "--model", "nope", "--out", "OUT"], None, "unknown model 'nope'; choose from smollm2-135m, llama3-8b, tiny-llama, a"),
    ("--random-weights with a value", [*RUN, "--random-weights", "yes"], None, 'python -m harness: unrecognized arguments: yes'),
    ("--no-memory-check with a value", [*RUN, "--no-memory-check", "yes"], None, 'python -m harness: unrecognized arguments: yes'),
    ("--workloads unknown", ["run", "--model", "tiny-llama", "--workloads", "nope", "--out", "OUT"], None, "unknown workload 'nope'; choose from latency, wikitext2, squad, squad-lo"),
    ("--workloads quality on random weights", ["run", "--model", "tiny-llama", "--workloads", "wikitext2", "--out", "OUT"], None, 'quality workloads (wikitext2) are refused on random weights; choose from'),
    ("--out through a file", [*RUN[:-1], "FILE/out"], None, '--out TMP/a-file/out: cannot write there (Not a directory)'),
    # run: latency
    ("--input-lens not integers", [*RUN, "--input-lens", "a,b"], None, 'python -m harness run: argument --input-lens/--context-lengths: expected'),
    ("--input-lens zero", [*RUN, "--input-lens", "0"], None, 'python -m harness run: argument --input-lens/--context-lengths: expected'),
    ("--output-len zero", [*RUN, "--output-len", "0"], None, 'python -m harness run: argument --output-len: expected positive integers'),
    ("--batch-sizes negative", [*RUN, "--batch-sizes", "-1"], None, 'python -m harness run: argument --batch-sizes: expected positive integer'),
    ("--warmup not an integer", [*RUN, "--warmup", "x"], None, "python -m harness run: argument --warmup: expected an integer, got 'x'"),
    ("--repetitions zero", [*RUN, "--repetitions", "0"], None, 'python -m harness run: argument --repetitions: expected positive integer'),
    # run: wikitext2
    ("--ppl-context zero", [*RUN, "--ppl-context", "0"], None, 'python -m harness run: argument --ppl-context: expected positive integer'),
    ("--ppl-stride not an integer", [*RUN, "--ppl-stride", "1.5"], None, 'python -m harness run: argument --ppl-stride: expected comma-separated i'),
    ("--max-eval-tokens negative", [*RUN, "--max-eval-tokens", "-5"], None, 'python -m harness run: argument --max-eval-tokens: expected >= 0, got -5'),
    ("--ppl-protocol unknown", [*RUN, "--ppl-protocol", "lm-eval"], None, "python -m harness run: argument --ppl-protocol: invalid choice: 'lm-eval"),
    ("--ppl-bos unknown", [*RUN, "--ppl-bos", "yes"], None, "python -m harness run: argument --ppl-bos: invalid choice: 'yes' (choose"),
    ("--kld-topk zero", [*RUN, "--kld-topk", "0"], None, 'python -m harness run: argument --kld-topk: expected positive integers, '),
    # run: squad
    ("--squad-n zero", [*RUN, "--squad-n", "0"], None, 'python -m harness run: argument --squad-n: expected positive integers, g'),
    ("--squad-shots not an integer", [*RUN, "--squad-shots", "two"], None, 'python -m harness run: argument --squad-shots: expected an integer, got '),
    ("--squad-batch zero", [*RUN, "--squad-batch", "0"], None, 'python -m harness run: argument --squad-batch: expected positive integer'),
    ("--squad-seed negative", [*RUN, "--squad-seed", "-1"], None, 'python -m harness run: argument --squad-seed: expected >= 0, got -1'),
    # run: squad-long
    ("--long-lengths not integers", [*RUN, "--long-lengths", "1k"], None, 'python -m harness run: argument --long-lengths: expected comma-separated'),
    ("--long-depths above 100", ["run", "--model", "smollm2-135m", "--backends", "hf:fp32", "--workloads", "squad-long",
                                 "--long-depths", "150", "--out", "OUT"], None, '--long-depths values must be in 0..100 percent, got 150'),
    ("--long-n zero", [*RUN, "--long-n", "0"], None, 'python -m harness run: argument --long-n: expected positive integers, go'),
    ("--long-max-paragraph zero", [*RUN, "--long-max-paragraph", "0"], None, 'python -m harness run: argument --long-max-paragraph: expected positive '),
    ("--long-batch zero", [*RUN, "--long-batch", "0"], None, 'python -m harness run: argument --long-batch: expected positive integers'),
    ("--long-seed negative", [*RUN, "--long-seed", "-3"], None, 'python -m harness run: argument --long-seed: expected >= 0, got -3'),
    # run: wikitext2-long
    ("--ppl-long-lengths zero", [*RUN, "--ppl-long-lengths", "0"], None, 'python -m harness run: argument --ppl-long-lengths: expected positive in'),
    ("--ppl-long-tail not an integer", [*RUN, "--ppl-long-tail", "half"], None, 'python -m harness run: argument --ppl-long-tail: expected comma-separate'),
    ("--ppl-long-segments zero", [*RUN, "--ppl-long-segments", "0"], None, 'python -m harness run: argument --ppl-long-segments: expected positive i'),
    ("--ppl-long-anchor zero", [*RUN, "--ppl-long-anchor", "0"], None, 'python -m harness run: argument --ppl-long-anchor: expected positive int'),
    ("--ppl-long-bos unknown", [*RUN, "--ppl-long-bos", "maybe"], None, "python -m harness run: argument --ppl-long-bos: invalid choice: 'maybe' "),
    # run: backends' options
    ("--backend-option without =", [*RUN, "--backend-option", "hf.threads"], None, 'python -m harness run: argument --backend-option: expected key=value, go'),
    ("--backend-option unknown backend", [*RUN, "--backend-option", "vllm.threads=2"], None, "option 'vllm.threads' is for backend 'vllm', which is not in this run (b"),
    ("--backend-option unknown option", [*RUN, "--backend-option", "hf.thread=2"], None, "hf: unknown option 'thread'; valid: device, threads, seed, attn, sliding"),
    ("--backend-option wrong type", [*RUN, "--backend-option", "hf.threads=many"], None, "hf: option threads='many': Input should be a valid integer, unable to pa"),
    ("--backend-option out of range", [*RUN, "--backend-option", "hf.threads=0"], None, "hf: option threads='0': Input should be greater than or equal to 1"),
    # run: limits, baseline, executors
    ("--timeout zero", [*RUN, "--timeout", "0"], None, 'python -m harness run: argument --timeout: expected positive integers, g'),
    ("--baseline not in the run", [*RUN, "--baseline", "mlc:q4f16_1"], None, '--baseline mlc:q4f16_1 is not a backend variant of this run; choose from'),
    ("--executor unknown", [*RUN, "--executor", "mpi"], None, "python -m harness run: argument --executor: invalid choice: 'mpi' (choos"),
    ("--ray-address without --executor ray", [*RUN, "--ray-address", "10.0.0.1:6379"], None, '--ray-address and --ray-cpus need --executor ray'),
    ("--ray-address not HOST:PORT", [*RUN, "--executor", "ray", "--ray-address", "head-node"], None, "--ray-address 'head-node': expected HOST:PORT (the GCS address 'ray star"),
    ("--ray-address unreachable", [*RUN, "--executor", "ray", "--ray-address", "127.0.0.1:9"], None, '--ray-address 127.0.0.1:9: cannot reach a Ray cluster there (Connection '),
    ("--ray-cpus zero", [*RUN, "--executor", "ray", "--ray-cpus", "0"], None, '--ray-cpus must be >= 1 (got 0)'),
    ("--slurm-partition without --executor slurm", [*RUN, "--slurm-partition", "gpu"], None, '--slurm-partition needs --executor slurm'),
    ("--slurm-account without --executor slurm", [*RUN, "--slurm-account", "lab"], None, '--slurm-account needs --executor slurm'),
    ("--slurm-gpus negative", [*RUN, "--executor", "slurm", "--slurm-gpus", "-1"], None, 'python -m harness run: argument --slurm-gpus: expected an integer >= 0, '),
    ("--slurm-cpus zero", [*RUN, "--executor", "slurm", "--slurm-cpus", "0"], None, 'python -m harness run: argument --slurm-cpus: expected an integer >= 1, '),
    ("--slurm-time not an integer", [*RUN, "--executor", "slurm", "--slurm-time", "4h"], None, 'python -m harness run: argument --slurm-time: expected an integer >= 1, '),
    ("--slurm-mem zero", [*RUN, "--executor", "slurm", "--slurm-mem", "0"], None, 'python -m harness run: argument --slurm-mem: expected an integer >= 1, g'),
    ("--slurm-local with a value", [*RUN, "--executor", "slurm", "--slurm-local", "yes"], None, 'python -m harness: unrecognized arguments: yes'),
    # sweep: flags
    ("sweep FILE missing", ["sweep", "NOFILE", "--out", "OUT"], None, 'TMP/missing: cannot read the sweep file (No such file or directory)'),
    ("sweep --resume with a value", ["sweep", "SWEEP", "--resume", "yes"], SWEEP_HEAD, 'python -m harness: unrecognized arguments: yes'),
    ("sweep --scale unknown", ["sweep", "SWEEP", "--scale", "huge", "--out", "OUT"], SWEEP_HEAD, "TMP/sweep.yaml:1: scales: no scale 'huge' in this file; scales: none"),
    ("sweep --dry-run with a value", ["sweep", "SWEEP", "--dry-run", "1"], SWEEP_HEAD, 'python -m harness: unrecognized arguments: 1'),
    ("sweep --no-memory-check with a value", ["sweep", "SWEEP", "--no-memory-check", "1"], SWEEP_HEAD, 'python -m harness: unrecognized arguments: 1'),
    ("sweep --timeout negative", ["sweep", "SWEEP", "--timeout", "-1"], SWEEP_HEAD, 'python -m harness sweep: argument --timeout: expected positive integers,'),
    ("sweep --executor unknown", ["sweep", "SWEEP", "--executor", "k8s"], SWEEP_HEAD, "python -m harness sweep: argument --executor: invalid choice: 'k8s' (cho"),
    # sweep file keys
    ("sweep file not YAML", ["sweep", "SWEEP", "--out", "OUT"], "backends: [hf:fp32\n", "TMP/sweep.yaml:2: not YAML (expected ',' or ']', but got '<stream end>')"),
    ("sweep file not a mapping", ["sweep", "SWEEP", "--out", "OUT"], "- hf:fp32\n", 'TMP/sweep.yaml:1: file: a sweep file is a mapping of keys (model, backen'),
    ("sweep key unknown", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "axis: {n_in: [1]}\n", 'TMP/sweep.yaml:4: axis: unknown key; valid: model, random_weights, backe'),
    ("sweep model unknown", ["sweep", "SWEEP", "--out", "OUT"], "model: nope\nbackends: [hf:fp32]\n", "unknown model 'nope'; choose from smollm2-135m, llama3-8b, tiny-llama, a"),
    ("sweep random_weights not a boolean", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "random_weights: often\n", 'TMP/sweep.yaml:4: random_weights: Input should be a valid boolean, unabl'),
    ("sweep backends not a list", ["sweep", "SWEEP", "--out", "OUT"], "model: tiny-llama\nbackends: hf:fp32\n", 'TMP/sweep.yaml:2: backends: Input should be a valid list'),
    ("sweep backends empty", ["sweep", "SWEEP", "--out", "OUT"], "model: tiny-llama\nbackends: []\n", 'TMP/sweep.yaml:2: backends: List should have at least 1 item after valid'),
    ("sweep backends unknown", ["sweep", "SWEEP", "--out", "OUT"], "model: tiny-llama\nbackends: [nope]\nworkloads: [latency]\n", "TMP/sweep.yaml:2: backends: unknown backend 'nope'; choose from hf, bnb,"),
    ("sweep workloads unknown", ["sweep", "SWEEP", "--out", "OUT"], "model: tiny-llama\nbackends: [hf:fp32]\nworkloads: [nope]\n", "TMP/sweep.yaml:3: workloads.0: unknown workload 'nope'; choose from late"),
    ("sweep workload parameter unknown", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "latency: {outputlen: 4}\n", 'TMP/sweep.yaml:4: latency.outputlen: unknown parameter; valid: batch, ba'),
    ("sweep workload parameter wrong type", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "latency: {output_len: x}\n", 'TMP/sweep.yaml:4: latency.output_len: latency.n_out must be an integer >'),
    ("sweep workload parameter out of range", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "latency: {warmup: -1}\n", 'TMP/sweep.yaml:4: latency.warmup: latency.warmup must be an integer >= 0'),
    ("sweep backend_options unknown backend", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "backend_options: {mlc: {threads: 2}}\n", 'TMP/sweep.yaml:4: backend_options.mlc: not a backend of this sweep (hf)'),
    ("sweep backend_options wrong type", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "backend_options: {hf: {threads: many}}\n", "TMP/sweep.yaml:4: backend_options.hf: hf: option threads='many': Input s"),
    ("sweep axes unknown parameter", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "axes: {n_layers: [1, 2]}\n", 'TMP/sweep.yaml:4: axes.n_layers: not a parameter of latency nor a BACKEN'),
    ("sweep axes unknown option", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "axes: {hf.attn: [sdpa, flash]}\n", "TMP/sweep.yaml:4: axes.hf.attn: hf: option attn='flash': Input should be"),
    ("sweep axes not lists", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "axes: {n_in: 16}\n", 'TMP/sweep.yaml:4: axes.n_in: Input should be a valid list'),
    ("sweep link of unequal axes", ["sweep", "SWEEP", "--out", "OUT"],
     SWEEP_HEAD + "axes: {n_in: [8, 16], batch: [1]}\nlink: [[n_in, batch]]\n", 'TMP/sweep.yaml:5: link.0: linked axes need equally many values'),
    ("sweep link naming no axis", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "axes: {n_in: [8]}\nlink: [[n_in, batch]]\n", "TMP/sweep.yaml:5: link.0: 'batch' is not an axis"),
    ("sweep exclude unknown key", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "exclude: [{layers: 2}]\n", "TMP/sweep.yaml:4: exclude.0.layers: not 'backend', 'workload' nor an axi"),
    ("sweep exclude empty entry", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "exclude: [{}]\n", 'TMP/sweep.yaml:4: exclude.0: an empty entry would drop every cell'),
    ("sweep baseline not in the sweep", ["sweep", "SWEEP", "--out", "OUT"], SWEEP_HEAD + "baseline: mlc:q4f16_1\n", 'TMP/sweep.yaml:4: baseline: mlc:q4f16_1 is not a backend variant of this'),
    ("sweep slurm unknown key", ["sweep", "SWEEP", "--out", "OUT", "--executor", "slurm"], SWEEP_HEAD + "slurm: {queue: gpu}\n", 'TMP/sweep.yaml:4: slurm.queue: unknown key; valid: partition, account, g'),
    ("sweep slurm wrong type", ["sweep", "SWEEP", "--out", "OUT", "--executor", "slurm"], SWEEP_HEAD + "slurm: {time_min: soon}\n", 'TMP/sweep.yaml:4: slurm.time_min: Input should be a valid integer'),
    ("sweep scales not a mapping", ["sweep", "SWEEP", "--scale", "full", "--out", "OUT"], SWEEP_HEAD + "scales: [full]\n", 'TMP/sweep.yaml:4: scales: scales must be a mapping: scale name -> the ke'),
    ("sweep results exist without --resume", ["sweep", "SWEEP", "--out", "RESULTS"], SWEEP_HEAD, 'TMP/results/results.jsonl already holds results: add --resume to continu'),
    # report, compare, status, list
    ("report missing file", ["report", "NOFILE.jsonl"], None, 'results file not found: TMP/missing.jsonl'),
    ("report unknown suffix", ["report", "SWEEP"], SWEEP_HEAD, "TMP/sweep.yaml: unknown results suffix '.yaml' (expected .jsonl, .csv, ."),
    ("report --baseline not in the results", ["report", "RESULTS/results.jsonl", "--baseline", "vllm:fp8"], None, '--baseline vllm:fp8: no ok record with that label in TMP/results/results'),
    ("report --out through a file", ["report", "RESULTS/results.jsonl", "--out", "FILE/out"], None, '--out TMP/a-file/out: cannot write there (Not a directory)'),
    ("compare one results file", ["compare", "RESULTS/results.jsonl"], None, 'compare takes two results files: the reference, then the new one'),
    ("compare --out through a file", ["compare", "RESULTS/results.jsonl", "RESULTS/results.jsonl", "--out", "FILE/x.md"], None, '--out TMP/a-file: cannot write there (File exists)'),
    ("status of a folder without a run", ["status", "OUT"], None, 'TMP/out: no plan.json here; give the --out folder of a run or sweep'),
    ("list --options unknown backend", ["list", "--options", "vllm"], None, "python -m harness list: argument --options: invalid choice: 'vllm' (choo"),
    ("cache action unknown", ["cache", "clean"], None, "argument action: invalid choice: 'clean' (choose from 'list', 'prune')"),
    ("cache --kind unknown", ["cache", "list", "--kind", "gguf"], None, "argument --kind: invalid choice: 'gguf'"),
    ("cache --older-than not positive", ["cache", "prune", "--older-than", "0"], None,
     "argument --older-than: expected a number of days > 0, got '0'"),
    ("cache list --all", ["cache", "list", "--all"], None, "--older-than, --all and --dry-run are for cache prune"),
    ("cache list --dry-run", ["cache", "list", "--dry-run"], None, "--older-than, --all and --dry-run are for cache prune"),
    ("unknown command", ["benchmark"], None, "python -m harness: argument command: invalid choice: 'benchmark' (choose"),
]


def run_case(argv: list[str], text: str | None, tmp) -> tuple[int, str]:
    """Run one case through ``harness.cli.main`` in the folder ``tmp`` (a ``pathlib.Path``):
    ``(exit code, stderr)``, with ``tmp`` written back as ``TMP`` in the message."""
    import contextlib
    import io
    import shutil
    from pathlib import Path

    from harness.cli import main

    tmp = Path(tmp)
    sweep = tmp / "sweep.yaml"
    if text is not None:
        sweep.write_text(text)
    (tmp / "a-file").write_text("")
    results = tmp / "results"
    results.mkdir(exist_ok=True)
    shutil.copy(Path(__file__).parent / "data" / "sweep-results.jsonl", results / "results.jsonl")
    places = {"OUT": str(tmp / "out"), "SWEEP": str(sweep), "NOFILE": str(tmp / "missing"),
              "FILE": str(tmp / "a-file"), "RESULTS": str(results)}

    def place(arg: str) -> str:
        for key, value in places.items():
            if arg == key or arg.startswith(key + "/") or arg.startswith(key + "."):
                return value + arg[len(key):]
        return arg

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([place(a) for a in argv])
    return code, err.getvalue().replace(str(tmp), "TMP")
