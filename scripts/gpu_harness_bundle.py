"""Pack what ``python -m harness run`` needs on an offline CUDA machine that has torch but not this
project's pins (the lent GPU machines: Python 3.12, torch 2.11 cu130, transformers 5.x, no index,
no Hub, 64 MiB carried per call).

    python scripts/gpu_harness_bundle.py --out .gpu/h --cuda 130
    # on the GPU machine, carrying .gpu/h (.gpu/ is in .git/info/exclude):
    bash scripts/gpu_harness_device.sh --backends hf,kvq,bnb

What goes in ``OUT`` (about 31 MB):

* ``whl/``: cp312 wheels of the versions installed here (transformers, tokenizers, huggingface-hub,
  optimum-quanto, pydantic and its parts), installed there with ``--no-deps --target``, so they
  shadow the image's own transformers;
* ``site/bitsandbytes``: the bitsandbytes package with only its CPU and ``libbitsandbytes_cuda{CUDA}``
  libraries (the wheel's other CUDA builds are 40 MB);
* ``models/{smollm2-135m,llama3-8b}``: the shipped architecture config and the embedded model's
  tokenizer, for ``--model DIR --random-weights`` (the real weights cannot travel);
* ``data/wikitext-2-raw-v1/test.txt``: the latency prompts' text (``HARNESS_DATA_DIR``).

Raises SystemExit (2) when a package is not installed here or the data file is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WHEELS = ("transformers", "tokenizers", "huggingface-hub", "optimum-quanto", "pydantic", "pydantic-core",
          "annotated-types", "typing-inspection")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")
MODELS = ("smollm2-135m", "llama3-8b")


def pinned(name: str) -> str:
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        raise SystemExit(f"error: {name} is not installed here; install the project first (scripts/install.sh)")


def download_cp312(requirements: list[str], dest: Path) -> None:
    """``pip download`` the wheels of ``requirements`` (no dependencies) for the GPU image's
    CPython 3.12 on x86-64 into ``dest`` (also used by ``mlc_cuda.py bundle``)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest),
                    *requirements], check=True)


def trimmed_bitsandbytes(site: Path, cuda: str, scratch: Path) -> None:
    """bitsandbytes unpacked into ``site`` with only its CPU library and the one for CUDA ``cuda``."""
    download_cp312([pinned("bitsandbytes")], scratch)
    wheel = next(scratch.glob("bitsandbytes-*.whl"))
    keep = {"libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{cuda}.so"}
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist()
                 if not (n.endswith(".so") and Path(n).name.startswith("libbitsandbytes_")) or Path(n).name in keep]
        if not any(Path(n).name == f"libbitsandbytes_cuda{cuda}.so" for n in names):
            raise SystemExit(f"error: {wheel.name} has no library for CUDA {cuda}")
        archive.extractall(site, members=names)


def model_dirs(models: Path) -> None:
    """Each shipped config beside the embedded model's tokenizer (``--model DIR --random-weights``
    takes the tokenizer beside the config: ``backends.models.random_weights_tokenizer_dir``)."""
    from backends.models import CONFIG_DIR, MODELS as REGISTERED, stand_in_tokenizer_dir

    tokenizer = stand_in_tokenizer_dir()
    for name in MODELS:
        target = models / name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(CONFIG_DIR / REGISTERED[name].config, target / "config.json")
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(tokenizer / file, target / file)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu" / "h")
    parser.add_argument("--cuda", default="130", help="the CUDA build of bitsandbytes to keep (130: CUDA 13.0)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    wikitext = args.data_dir / "wikitext-2-raw-v1" / "test.txt"
    if not wikitext.is_file():
        print(f"error: {wikitext} not found (--data-dir)", file=sys.stderr)
        return 2
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "data" / "wikitext-2-raw-v1").mkdir(parents=True)
    shutil.copy(wikitext, args.out / "data" / "wikitext-2-raw-v1" / "test.txt")
    download_cp312([pinned(name) for name in WHEELS], args.out / "whl")
    trimmed_bitsandbytes(args.out / "site", args.cuda, args.out / "scratch")
    shutil.rmtree(args.out / "scratch")
    model_dirs(args.out / "models")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
