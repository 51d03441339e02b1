"""Export a local Hugging Face checkpoint to an ONNX decoder with past key values (optimum-onnx).

The graph is optimum's ``text-generation-with-past`` export (one graph serving prefill, with an
empty past, and incremental decode): inputs ``input_ids`` ``[batch, seq]`` int64,
``attention_mask`` ``[batch, past + seq]`` int64, ``position_ids`` ``[batch, seq]`` int64 and
``past_key_values.{i}.key/value`` ``[batch, kv_heads, past, head_dim]`` float32; outputs ``logits``
``[batch, seq, vocab]`` float32 and ``present.{i}.key/value`` ``[batch, kv_heads, past + seq,
head_dim]``.
"""

from __future__ import annotations

import time
from pathlib import Path

from backends.base import BackendError
from backends.onnx.artifacts import EXPORT_TASK, MODEL_FILE


def export_decoder(checkpoint: Path, target: Path, opset: int | None = None) -> float:
    """Export ``checkpoint`` into ``target/model.onnx`` (fp32, CPU tracing); returns seconds taken.

    Raises:
        BackendError: optimum cannot export this checkpoint (unsupported architecture, unreadable
            weights, missing package); the message names the cause in one line.
    """
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise BackendError(f"onnx export needs optimum-onnx: pip install quantarena[onnx] ({exc})") from None
    started = time.perf_counter()
    try:
        main_export(
            str(checkpoint),
            output=str(target),
            task=EXPORT_TASK,
            opset=opset,
            device="cpu",
            dtype="fp32",
            do_validation=False,  # validation re-runs both models; our tests compare with hf instead
            local_files_only=True,
        )
    except Exception as exc:  # optimum raises ValueError/KeyError/OSError/RuntimeError by case
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise BackendError(
            f"onnx export of {checkpoint.name} failed: {type(exc).__name__}: {first_line}"
        ) from exc
    if not (target / MODEL_FILE).is_file():
        raise BackendError(f"onnx export of {checkpoint.name} wrote no {MODEL_FILE}")
    return time.perf_counter() - started
