"""Evaluation data: a local copy under ``$HARNESS_DATA_DIR`` first, the Hugging Face Hub otherwise.

Layout of a local copy (what ``../shared/data`` holds):
``wikitext-2-raw-v1/test.txt`` (the test split's rows joined with blank lines) and
``squad_v2/*.json`` (official SQuAD 2.0 format). From the Hub the same text comes from ``wikitext``
/ ``wikitext-2-raw-v1`` / ``test`` joined with ``"\\n\\n"``, as the transformers perplexity guide does.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from workloads.base import WorkloadError

ENV_VAR = "HARNESS_DATA_DIR"
WIKITEXT2_FILE = "wikitext-2-raw-v1/test.txt"  # relative to the data directory
SQUAD_GLOB = "squad_v2/*.json"


def data_dir() -> Path | None:
    """The local data directory from ``$HARNESS_DATA_DIR`` (resolved), or None when unset.

    Raises:
        WorkloadError: the variable is set but is not a directory.
    """
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise WorkloadError(f"{ENV_VAR}={value} is not a directory")
    return path


@functools.lru_cache(maxsize=1)
def wikitext2_test_text() -> str:
    """The WikiText-2 raw test split as one string (1,294,336 characters in the shared copy).

    Raises:
        WorkloadError: neither a local copy nor the Hub is reachable (one-line reason).
    """
    local = data_dir()
    if local is not None:
        path = local / WIKITEXT2_FILE
        if not path.is_file():
            raise WorkloadError(f"WikiText-2 not found: {path} is missing")
        return path.read_text(encoding="utf-8")
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # offline or no datasets: say how to fix it
        raise WorkloadError(
            f"WikiText-2 unavailable: set {ENV_VAR} to a local copy, or allow Hub access "
            f"({type(exc).__name__})"
        ) from None
    return "\n\n".join(rows["text"])


@functools.lru_cache(maxsize=4)
def wikitext2_token_ids(tokenizer) -> tuple[int, ...]:
    """The whole test text tokenized once without special tokens (no BOS: the embedded model's GGUF
    tokenizer would prepend its chat token ``<|im_start|>``, which raw text never contains).

    The ids are kept on disk (``token_cache_path``): tokenizing 1.3 M characters took ~1 s in
    every worker process, one per backend variant."""
    text = wikitext2_test_text()
    path = token_cache_path(tokenizer, text)
    if path is not None and path.is_file():
        try:
            return tuple(np.load(path).tolist())
        except (OSError, ValueError):  # a damaged file: tokenize again and replace it
            pass
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    if path is not None:
        from backends.artifact_cache import replace_atomically

        def save(tmp: Path) -> None:
            with tmp.open("wb") as handle:  # a handle: np.save would append ".npy" to a path
                np.save(handle, np.asarray(ids, dtype=np.int64))

        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, save)
    return ids


def token_cache_path(tokenizer, text: str) -> Path | None:
    """Where the token ids of ``text`` under ``tokenizer`` are kept:
    ``$QUANTARENA_CACHE/tokens/<sha256 of the text and the tokenizer's serialized definition>.npy``;
    None for a tokenizer without one (not a fast tokenizer), whose ids are not kept."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from backends.models import cache_root

    digest = hashlib.sha256(text.encode())
    digest.update(backend.to_str().encode())
    return cache_root() / "tokens" / f"{digest.hexdigest()[:32]}.npy"
