"""Export a local Hugging Face checkpoint to an ONNX decoder with past key values (optimum-onnx).

The graph is optimum's ``text-generation-with-past`` export (one graph serving prefill, with an
empty past, and incremental decode): inputs ``input_ids`` ``[batch, seq]`` int64,
``attention_mask`` ``[batch, past + seq]`` int64, ``position_ids`` ``[batch, seq]`` int64 and
``past_key_values.{i}.key/value`` ``[batch, kv_heads, past, head_dim]`` float32; outputs ``logits``
``[batch, kept, vocab]`` float32 and ``present.{i}.key/value`` ``[batch, kv_heads, past + seq,
head_dim]``.

One edit after the export (``add_logits_to_keep``): an int64 scalar input ``logits_to_keep``
selects how many trailing positions reach the ``lm_head`` MatMul (``kept = logits_to_keep``, or
``seq`` when it is 0), as transformers' ``logits_to_keep`` argument does (optimum exports with it
fixed at 0, i.e. every position). Generation passes 1, so prefill computes and copies the last
position's logits only, as transformers' ``generate`` and the TVM and llama.cpp backends do;
scoring passes 0.
"""

from __future__ import annotations

import time
from pathlib import Path

from backends.base import BackendError
from backends.onnx.artifacts import EXPORT_TASK, MODEL_FILE

LOGITS_TO_KEEP = "logits_to_keep"
# Element-wise ops that may sit between the lm_head MatMul and the logits output (a bias, a cast,
# logit soft-capping); slicing positions before them changes nothing but the sequence length.
_ELEMENTWISE = frozenset({"Cast", "Add", "Mul", "Div", "Tanh", "Identity"})


def add_logits_to_keep(model_path: Path) -> None:
    """Add the ``logits_to_keep`` input to an exported decoder, in place.

    Inserts ``Slice(hidden, starts=[-logits_to_keep], ends=[INT64_MAX], axes=[1])`` on the input of
    the ``lm_head`` MatMul (the last MatMul before the ``logits`` output), so that MatMul, and every
    op after it, runs on the kept positions only: ``logits`` becomes ``[batch, kept, vocab]``.
    ``logits_to_keep`` is an int64 scalar; 0 keeps all positions (``-0 = 0``: transformers'
    ``slice(-logits_to_keep, None)``). External-data references are left as they are.

    Raises:
        BackendError: the graph has no ``logits`` output produced (through element-wise ops only)
            by a MatMul.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    if any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return
    producers = {out: node for node in graph.node for out in node.output}
    node, downstream = producers.get("logits"), []
    while node is not None and node.op_type in _ELEMENTWISE:
        downstream.extend(node.output)
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        raise BackendError(f"cannot add {LOGITS_TO_KEEP} to {model_path.name}: no lm_head MatMul feeds 'logits'")
    index = next(i for i, n in enumerate(graph.node) if list(n.output) == list(node.output))
    prefix = f"{node.name or '/lm_head/MatMul'}/{LOGITS_TO_KEEP}"
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/shape"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{prefix}/ends"),
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axes"),
    ])
    sliced = f"{prefix}/hidden"
    added = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{prefix}/neg"], name=f"{prefix}/Neg"),
        helper.make_node("Reshape", [f"{prefix}/neg", f"{prefix}/shape"], [f"{prefix}/starts"],
                         name=f"{prefix}/Reshape"),
        helper.make_node("Slice", [node.input[0], f"{prefix}/starts", f"{prefix}/ends", f"{prefix}/axes"],
                         [sliced], name=f"{prefix}/Slice"),
    ]
    node.input[0] = sliced
    nodes = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(nodes[:index] + added + nodes[index:])  # stays topologically sorted
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    # shapes recorded for the MatMul's output and after it no longer hold on the sequence axis
    stale = set(node.output) | set(downstream)
    kept = [v for v in graph.value_info if v.name not in stale]
    graph.ClearField("value_info")
    graph.value_info.extend(kept)
    for output in graph.output:
        if output.name == "logits" and len(output.type.tensor_type.shape.dim) == 3:
            output.type.tensor_type.shape.dim[1].dim_param = "kept_positions"
    onnx.save(model, str(model_path))


def export_decoder(checkpoint: Path, target: Path, opset: int | None = None) -> float:
    """Export ``checkpoint`` into ``target/model.onnx`` (fp32, CPU tracing) and add the
    ``logits_to_keep`` input (``add_logits_to_keep``); returns seconds taken by both.

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
    add_logits_to_keep(target / MODEL_FILE)
    return time.perf_counter() - started
