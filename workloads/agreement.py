"""Agreement of a backend with the run's baseline, on the same scored tokens and the same prompts.

Two comparisons, both against the baseline backend variant of the run (``--baseline``, default
``hf:fp32`` on CPU and ``hf:fp16`` on CUDA):

- **Distributions** (wikitext2): the statistics of llama.cpp's ``llama-perplexity
  --kl-divergence`` (``tools/perplexity/perplexity.cpp``, ``kl_divergence``), over the tokens both
  backends scored: mean KL divergence KLD(base || q) with its standard error, median / p99 /
  max KLD, top-1 agreement ("Same top p"), RMS of the difference of the correct token's
  probability ("RMS Δp"), and ln(PPL(q)/PPL(base)) as the paired per-token mean of
  ``nll_q - nll_base`` with its standard error. The baseline's wikitext2 cell writes its
  distributions compactly (``BaselineStore``: top-k log-probs in fp16, their ids and the log of
  the remaining mass, ``backends.scoring.compact_topk``) to ``OUT/baseline/``; the other
  backends' cells read them (``backends.scoring.topk_agreement``).
- **Greedy generations** (latency): the share of identical greedy tokens and the first divergent
  token (FDT, OpenVINO who-what-benchmark's ``evaluate_divergency``: the length of the common
  prefix), from the token ids of the first timed repetition (``generation_agreement``; the runner
  adds it to the record, since both records are in hand there).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backends.artifact_cache import replace_atomically
from backends.scoring import CompactLogprobs

# Tokens kept per scored position in the baseline's store (the default of ``--kld-topk``). The gap
# this leaves between the top-k + rest KLD and the exact full-vocabulary KLD is measured in
# docs/metrics.md: about 10% of the mean KLD on SmolLM2 at k = 256 (20% at 64, 4% at 1024).
TOPK = 256
# Scored tokens per block in ``samples.nll_block_sums`` (a paired bootstrap resamples blocks).
BLOCK_TOKENS = 128


@dataclass
class Comparison:
    """What the harness tells a workload about the run's baseline (``Workload.comparison``).

    Attributes:
        baseline: the baseline's label (``name:variant``), or None when the run has none.
        is_baseline: the job being run is the baseline (it writes the store; the others read it).
        directory: the run's output folder; stores live under ``directory/baseline/``.
        note: why there is no baseline (when ``baseline`` is None).
    """

    baseline: str | None
    is_baseline: bool = False
    directory: str = "."
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Comparison":
        return cls(**data)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("_")


def store_path(directory: str | Path, model: str, baseline: str, params: dict[str, Any]) -> Path:
    """Where the baseline's distributions for one wikitext2 cell live:
    ``directory/baseline/<model>-<baseline>-<every param name and value>.npz``, so a store made
    with another protocol, context, stride, token count or BOS setting never matches."""
    key = "-".join(f"{name}{value}" for name, value in sorted(params.items()))
    return Path(directory) / "baseline" / f"{_slug(model)}-{_slug(baseline)}-{_slug(key)}.npz"


class BaselineStore:
    """The baseline's scored tokens and compact distributions for one wikitext2 cell.

    Arrays (``N`` scored tokens over all windows, in scoring order; ``k = TOPK``):
    ``targets`` int32 ``[N]``, ``logprobs`` float64 ``[N]`` (the exact target log-probs),
    ``topk`` (``CompactLogprobs``: float32 ``[N]``, float16 ``[N, k]``, int32 ``[N, k]``, float32
    ``[N]``) and
    ``offsets`` int64 ``[n_windows + 1]`` (window ``i`` is ``offsets[i]:offsets[i+1]``).
    """

    def __init__(self) -> None:
        self._targets: list[np.ndarray] = []
        self._logprobs: list[np.ndarray] = []
        self._topk: list[CompactLogprobs] = []
        self.offsets = np.zeros(1, dtype=np.int64)
        self.targets = self.logprobs = None
        self.topk: CompactLogprobs | None = None
        self.meta: dict[str, Any] = {}

    def add(self, targets: np.ndarray, logprobs: np.ndarray, topk: CompactLogprobs) -> None:
        """Append one window's scored tokens ``[n]``, their log-probs ``[n]`` and compact rows."""
        self._targets.append(np.asarray(targets, dtype=np.int32))
        self._logprobs.append(np.asarray(logprobs, dtype=np.float64))
        self._topk.append(topk)
        self.offsets = np.append(self.offsets, self.offsets[-1] + len(targets))

    def save(self, path: Path, meta: dict[str, Any]) -> int:
        """Write the store (numpy ``.npz``, atomically: a temporary file renamed); returns its bytes."""
        topk = CompactLogprobs.concatenate(self._topk)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(temporary: Path) -> None:
            with temporary.open("wb") as handle:
                np.savez(handle, offsets=self.offsets, targets=np.concatenate(self._targets),
                         logprobs=np.concatenate(self._logprobs), topk_top=topk.top, topk_logprobs=topk.logprobs,
                         topk_ids=topk.ids, log_rest=topk.log_rest, meta=np.array(json.dumps(meta)))

        replace_atomically(path, write)
        return path.stat().st_size

    @classmethod
    def load(cls, path: Path) -> "BaselineStore":
        """Read a store written by ``save``.

        Raises:
            FileNotFoundError: no store at ``path``.
        """
        store = cls()
        with np.load(path, allow_pickle=False) as data:
            store.offsets = data["offsets"]
            store.targets, store.logprobs = data["targets"], data["logprobs"]
            store.topk = CompactLogprobs(data["topk_top"], data["topk_logprobs"], data["topk_ids"], data["log_rest"])
            store.meta = json.loads(str(data["meta"]))
        return store

    @property
    def n_windows(self) -> int:
        return len(self.offsets) - 1

    def window(self, index: int) -> tuple[CompactLogprobs, np.ndarray]:
        """Window ``index``'s compact rows and the baseline's target log-probs (float64 ``[n]``)."""
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.topk.rows(start, stop), self.logprobs[start:stop]


def _mean_se(values: np.ndarray) -> tuple[float, float | None]:
    """Mean and its standard error ``std(ddof=1) / sqrt(n)`` (llama.cpp's ``mean_and_uncertainty``:
    ``sqrt((<x^2> - <x>^2) / (n - 1))``, the same number); no SE below two values."""
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None)


def agreement_summary(kld: np.ndarray, same_top: np.ndarray, logprobs: np.ndarray,
                      base_logprobs: np.ndarray) -> dict[str, Any]:
    """llama.cpp's ``--kl-divergence`` statistics over ``n`` scored tokens.

    Args:
        kld: float64 ``[n]`` per-token KLD(base || q), nats (``backends.scoring.topk_agreement``).
        same_top: bool ``[n]`` argmax(q) == argmax(base).
        logprobs, base_logprobs: float64 ``[n]`` target log-probs of q and of the baseline.

    Returns:
        ``n_tokens``; ``kld_mean``, ``kld_mean_se``, ``kld_median``, ``kld_p99``, ``kld_max`` (nats;
        percentiles by linear interpolation, as llama.cpp's); ``top1_pct`` and ``top1_pct_se``
        (``sqrt(p(1-p)/(n-1))``); ``rms_dp_pct`` and ``rms_dp_pct_se`` (``sqrt(mean(Δp^2))`` with
        ``Δp = p_q(correct) - p_base(correct)``, percent; SE ``0.5 / rms * SE(Δp^2)``);
        ``ln_ppl_ratio`` and ``ln_ppl_ratio_se`` (mean and SE of ``nll_q - nll_base`` per token,
        which equals llama.cpp's ``ln(PPL(Q)/PPL(base))`` and its covariance-corrected uncertainty).

    Raises:
        ValueError: no tokens, or arrays of different lengths.
    """
    n = len(kld)
    if n == 0 or not len(same_top) == len(logprobs) == len(base_logprobs) == n:
        raise ValueError(f"agreement needs equally many tokens (got {n}, {len(same_top)}, {len(logprobs)}, "
                         f"{len(base_logprobs)})")
    kld_mean, kld_se = _mean_se(kld)
    top = float(np.mean(same_top))
    dp2 = (np.exp(logprobs) - np.exp(base_logprobs)) ** 2
    mse, mse_se = _mean_se(dp2)
    rms = float(np.sqrt(mse))
    ratio, ratio_se = _mean_se(base_logprobs - logprobs)  # nll_q - nll_base
    return {
        "n_tokens": n,
        "kld_mean": kld_mean, "kld_mean_se": kld_se,
        "kld_median": float(np.median(kld)), "kld_p99": float(np.percentile(kld, 99)), "kld_max": float(kld.max()),
        "top1_pct": 100 * top, "top1_pct_se": 100 * float(np.sqrt(top * (1 - top) / (n - 1))) if n > 1 else None,
        "rms_dp_pct": 100 * rms,
        "rms_dp_pct_se": 100 * 0.5 / rms * mse_se if rms > 0 and mse_se is not None else None,
        "ln_ppl_ratio": ratio, "ln_ppl_ratio_se": ratio_se,
    }


def block_sums(nll: np.ndarray, block: int = BLOCK_TOKENS) -> list[float]:
    """Sums of ``nll`` (float ``[N]``, scoring order) over consecutive blocks of ``block`` tokens;
    the last block holds the remainder (``N % block`` tokens, when not 0)."""
    nll = np.asarray(nll, dtype=np.float64)
    return [float(nll[start:start + block].sum()) for start in range(0, len(nll), block)]


def first_divergence(tokens: Sequence[int], base_tokens: Sequence[int]) -> int:
    """The first divergent token (FDT): the 0-based position of the first token that differs, i.e.
    the length of the common prefix (``min(len)`` when one is a prefix of the other; the full
    length when identical). who-what-benchmark takes it from difflib's first matching block
    starting at 0 in both sequences, the same number."""
    n = min(len(tokens), len(base_tokens))
    return next((i for i in range(n) if int(tokens[i]) != int(base_tokens[i])), n)


def generation_agreement(tokens: Sequence[Sequence[int]], base_tokens: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Greedy-generation agreement of ``tokens`` (``[batch][n]``) with the baseline's for the same
    prompts.

    Returns:
        ``identical_pct``: percent of the baseline's token positions where the two sequences hold
        the same token; ``fdt_mean`` and ``fdt_min``: the first divergent token over the sequences
        (= ``n`` when a sequence matches throughout); ``n_sequences``; ``n_tokens`` (the
        baseline's tokens per sequence, the largest).

    Raises:
        ValueError: different batch sizes, or no sequences.
    """
    if len(tokens) != len(base_tokens) or not tokens:
        raise ValueError(f"{len(tokens)} sequences against the baseline's {len(base_tokens)}")
    fdt = [first_divergence(a, b) for a, b in zip(tokens, base_tokens)]
    same = sum(sum(int(x) == int(y) for x, y in zip(a, b)) for a, b in zip(tokens, base_tokens))
    total = sum(len(b) for b in base_tokens)
    return {"identical_pct": 100 * same / total if total else None, "fdt_mean": float(np.mean(fdt)),
            "fdt_min": int(min(fdt)), "n_sequences": len(tokens), "n_tokens": max(len(b) for b in base_tokens)}
