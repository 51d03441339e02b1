"""Token-id plumbing every backend shares: special tokens from the checkpoint, prompt checks,
left padding, stop sets.

Every backend reads the same checkpoint directory (``backends.models.checkpoint_dir``), so reading
end-of-sequence and padding ids from its ``generation_config.json`` / ``config.json`` here gives
every backend the same ids (transformers' ``GenerationConfig`` falls back to ``config.json`` the
same way).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class SpecialTokens:
    """The ids that end and pad a sequence, and the vocabulary size.

    Attributes:
        eos_ids: end-of-sequence ids (generation stops after one unless suppressed).
        pad_id: the id left padding uses (the first EOS id when the model defines none, 0 without
            either; padded positions are masked out, so its value never changes a result).
        vocab_size: token ids must lie in ``[0, vocab_size)``.
    """

    eos_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int

    @classmethod
    def from_checkpoint(cls, directory: Path) -> "SpecialTokens":
        """Read ``generation_config.json`` first, then ``config.json`` (its text config for
        multimodal configs)."""
        config = _read_json(directory / "config.json")
        text = config.get("text_config") or config
        generation = _read_json(directory / "generation_config.json")

        def pick(key: str) -> Any:
            for source in (generation, config, text):
                if source.get(key) is not None:
                    return source[key]
            return None

        eos = pick("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        pad = pick("pad_token_id")
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        return cls(eos_ids, int(pad), int(text.get("vocab_size") or config.get("vocab_size")))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_prompts(label: str, prompt_token_ids: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raises ``ValueError`` (prefixed with ``label``): no prompts, an empty prompt, or a token id
    outside ``[0, vocab_size)``."""
    if not prompt_token_ids:
        raise ValueError(f"{label}: no prompts")
    for row, prompt in enumerate(prompt_token_ids):
        if len(prompt) == 0:
            raise ValueError(f"{label}: empty prompt (row {row})")
        bad = next((t for t in prompt if not 0 <= int(t) < vocab_size), None)
        if bad is not None:
            raise ValueError(f"{label}: token id {bad} is out of range, outside the vocabulary [0, {vocab_size})")


def left_pad(prompt_token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad a batch of non-empty prompts, as batched decoder-only generation needs.

    Returns:
        ``(input_ids, attention_mask)``, both int64 ``[batch, max_len]``; the mask is 1 on real tokens.
    """
    width = max(len(p) for p in prompt_token_ids)
    input_ids = np.full((len(prompt_token_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, prompt in enumerate(prompt_token_ids):
        input_ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return input_ids, mask


def stop_token_set(eos_token_ids: Sequence[int], stop_token_ids: Sequence[int]) -> list[int]:
    """The ids that end a sequence: the model's end-of-sequence ids, then the caller's stop ids,
    as ints, duplicates dropped, order kept."""
    return list(dict.fromkeys(int(t) for t in (*eos_token_ids, *stop_token_ids)))


def trim_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Cut a generated sequence after its first stop token (the stop token is kept)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens
