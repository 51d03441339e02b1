"""ONNX Runtime backend: export, the artifact cache, each variant's contract, errors, and (e2e)
perplexity on SmolLM2 against the transformers baseline."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("optimum.exporters.onnx")

import onnx  # noqa: E402

from backends.base import BackendError, ScoringWindow, backend_class, variant_availability  # noqa: E402
from backends.hf.backend import TransformersBackend, module_weight_bytes  # noqa: E402
from backends.models import ModelSpec  # noqa: E402
from backends.onnx import artifacts  # noqa: E402
from backends.onnx.backend import OnnxRuntimeBackend  # noqa: E402

PROMPTS = [[1, 400, 5000, 61, 9000, 12], [800, 77, 1000]]
WINDOW = ScoringWindow(tuple(int(t) for t in np.random.default_rng(0).integers(0, 49152, 48)), 7)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """A private artifact cache for this module (checkpoints stay in the shared cache)."""
    root = tmp_path_factory.mktemp("onnx-cache")
    patch = pytest.MonkeyPatch()
    patch.setattr(artifacts, "cache_root", lambda: root)
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def hf(tiny_backends):
    return tiny_backends("hf", "fp32", threads=2)


@pytest.fixture(scope="module")
def fp32(tiny_model, onnx_cache):
    backend = OnnxRuntimeBackend("fp32", {"threads": 2})
    report = backend.load(tiny_model)
    yield backend, report
    backend.close()


def ops(model_path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(model_path), load_external_data=False).graph.node}


# --- registry and options ---------------------------------------------------------------------
def test_registered_and_available():
    assert backend_class("onnx") is OnnxRuntimeBackend
    for variant in ("fp32", "int8", "int4"):
        assert variant_availability("onnx", variant).ok
    with pytest.raises(BackendError, match="unknown variant onnx:fp16"):
        OnnxRuntimeBackend("fp16")


def test_bad_options_are_one_line_errors_at_construction():
    with pytest.raises(BackendError, match="option int4_block_size=48: .*power of two"):
        OnnxRuntimeBackend("int4", {"int4_block_size": 48})
    with pytest.raises(BackendError, match="option int8_per_channel='maybe': .*valid boolean"):
        OnnxRuntimeBackend("int8", {"int8_per_channel": "maybe"})
    with pytest.raises(BackendError, match="option int4_algorithm='gptq': .*'rtn' or 'hqq'"):
        OnnxRuntimeBackend("int4", {"int4_algorithm": "gptq"})
    with pytest.raises(BackendError, match="option threads='many': .*valid integer"):
        OnnxRuntimeBackend("fp32", {"threads": "many"})
    with pytest.raises(BackendError, match="option device='tpu': .*'auto', 'cpu' or 'cuda'"):
        OnnxRuntimeBackend("fp32", {"device": "tpu"})


def test_cuda_request_without_cuda_says_why(tiny_model, onnx_cache):
    from backends.device import cuda_available

    if cuda_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(BackendError, match="device=cuda requested but no CUDA device visible"):
        OnnxRuntimeBackend("fp32", {"device": "cuda"}).load(tiny_model)


# --- export and the fp32 contract -------------------------------------------------------------
def test_export_is_a_decoder_with_past(fp32):
    backend, report = fp32
    names = {i.name for i in backend.session.get_inputs()}
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= names
    prepared = report.preparation
    assert prepared.cache_hit is False and report.details["export_done_now"] is True
    assert prepared.export_s > 0 and prepared.quantize_s == 0
    on_disk = sum(p.stat().st_size for p in Path(prepared.artifact_dir).iterdir() if p.name != "manifest.json")
    assert prepared.artifact_bytes == on_disk
    assert report.details["provider"] == "CPUExecutionProvider" and backend.info()["threads"] == 2
    assert backend.session.get_session_options().intra_op_num_threads == 2


def test_fp32_weight_bytes_match_the_torch_model(fp32, hf):
    _, report = fp32
    torch_bytes = module_weight_bytes(hf.model)
    # The export may store a tied lm_head twice (a transposed copy); never less than the model.
    assert torch_bytes <= report.weight_bytes <= 2 * torch_bytes


def test_fp32_loglikelihood_matches_transformers(fp32, hf):
    backend, _ = fp32
    ours = backend.loglikelihood([WINDOW, ScoringWindow((5,), 0)])
    reference = hf.loglikelihood([WINDOW])[0]
    assert ours[0].shape == (WINDOW.n_scored,) and ours[0].dtype == np.float64
    np.testing.assert_allclose(ours[0], reference, atol=1e-4)
    assert ours[1].shape == (0,)


def test_fp32_generation_matches_transformers_batched_and_single(fp32, hf):
    backend, _ = fp32
    ours = backend.generate(PROMPTS, 6, min_new_tokens=6)
    reference = hf.generate(PROMPTS, 6, min_new_tokens=6)
    assert ours.token_ids == reference.token_ids
    for row, prompt in enumerate(PROMPTS):  # left padding changes nothing
        assert backend.generate([prompt], 6, min_new_tokens=6).token_ids[0] == ours.token_ids[row]
    assert ours.n_steps == 6
    times = [ours.start_s, *ours.step_times_s]
    assert all(a < b for a, b in zip(times, times[1:]))
    # KV cache: 2 layers x (key, value) x batch 2 x 2 kv heads x head_dim 16 x fp32, per position.
    width = max(map(len, PROMPTS))
    per_position = 2 * 2 * 2 * 2 * 16 * 4
    assert ours.extra["kv_cache_bytes_prefill"] == per_position * width
    assert ours.extra["kv_cache_bytes"] == per_position * (width + 5)


def test_decode_is_incremental(fp32, monkeypatch):
    """Each decode step feeds one token and the previous presents, not the whole sequence."""
    backend, _ = fp32
    seen = []
    original = backend._run

    def spy(input_ids, attention_mask, position_ids, past, last_only):
        seen.append((input_ids.shape, past is None, attention_mask.shape))
        return original(input_ids, attention_mask, position_ids, past, last_only)

    monkeypatch.setattr(backend, "_run", spy)
    backend.generate([PROMPTS[0]], 4, min_new_tokens=4)
    assert seen[0] == ((1, 6), True, (1, 6))
    assert seen[1:] == [((1, 1), False, (1, 6 + k)) for k in (1, 2, 3)]


def test_prefill_computes_and_copies_only_the_last_positions_logits(fp32, hf, monkeypatch):
    """The graph's lm_head runs on the last prompt position only at prefill ([batch, 1, vocab]
    comes out of the session, not [batch, n_in, vocab]); tokens still equal transformers'; scoring
    still gets every position."""
    backend, _ = fp32
    session = backend.session
    produced = []

    class Recording:  # the real session; records the shape of the logits each run produced
        def __getattr__(self, name):
            return getattr(session, name)

        def run_with_iobinding(self, binding, *args):
            session.run_with_iobinding(binding, *args)
            produced.append(tuple(binding.get_outputs()[0].shape()))

    monkeypatch.setattr(backend, "session", Recording())
    out = backend.generate(PROMPTS, 4, min_new_tokens=4)
    vocab = produced[0][-1]
    assert vocab == backend.special.vocab_size
    assert produced == [(2, 1, vocab)] * 4  # prefill (2 prompts of up to 6 tokens), then 3 decode steps
    assert out.token_ids == hf.generate(PROMPTS, 4, min_new_tokens=4).token_ids
    produced.clear()
    backend.loglikelihood([WINDOW])
    assert produced == [(1, len(WINDOW.token_ids), vocab)]


def test_stop_tokens_and_min_new_tokens(fp32):
    backend, _ = fp32
    first = backend.generate([PROMPTS[0]], 4, min_new_tokens=4).token_ids[0][0]
    stopped = backend.generate([PROMPTS[0]], 4, stop_token_ids=[first])
    assert stopped.token_ids == [[first]] and stopped.n_steps == 1
    suppressed = backend.generate([PROMPTS[0]], 3, min_new_tokens=3, stop_token_ids=[first])
    assert len(suppressed.token_ids[0]) == 3 and first not in suppressed.token_ids[0]


def test_bad_input_is_a_backend_error(fp32, tiny_model):
    backend, _ = fp32
    with pytest.raises(BackendError, match="empty prompt"):
        backend.generate([[1, 2], []], 2)
    with pytest.raises(BackendError, match="outside the vocabulary"):
        backend.generate([[1, 10**7]], 2)
    with pytest.raises(BackendError, match="max_new_tokens"):
        backend.generate([[1, 2]], 0)
    with pytest.raises(BackendError, match="before load"):
        OnnxRuntimeBackend("fp32").generate([[1]], 1)


def test_info_and_memory(fp32):
    backend, _ = fp32
    info = backend.info()
    assert info["provider"] == "CPUExecutionProvider" and "no CUDA" in info["provider_note"]
    assert info["threads"] == 2 and info["opset"] >= 14
    assert info["library"]["onnxruntime"] and info["quantization"]["method"] == "none"
    assert backend.memory()["rss"] > 0


# --- the cache --------------------------------------------------------------------------------
def test_second_load_uses_the_cache(fp32, tiny_model, monkeypatch):
    _, first = fp32

    def no_export(*args, **kwargs):
        raise AssertionError("export ran although the cache entry is valid")

    monkeypatch.setattr("backends.onnx.export.export_decoder", no_export)
    again = OnnxRuntimeBackend("fp32", {"threads": 2})
    report = again.load(tiny_model)
    assert report.preparation.cache_hit is True and report.details["export_done_now"] is False
    assert report.preparation.artifact_dir == first.preparation.artifact_dir
    assert report.preparation.export_s == first.preparation.export_s  # the recorded cost, not re-measured
    again.close()


def test_weight_bytes_count_constant_folded_transposes(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "w")
    scale = numpy_helper.from_array(np.ones((3,), dtype=np.int8), "s")
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight, scale],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    facts = artifacts.graph_facts(path)
    assert facts == {"opset": 17, "weight_bytes": 48 + 3 + 48, "folded_weight_bytes": 48}


def test_cache_key_changes_with_settings_and_versions(monkeypatch):
    a = artifacts.entry_key("model", "int4", {"block_size": 32})
    assert a != artifacts.entry_key("model", "int4", {"block_size": 64})
    assert a != artifacts.entry_key("model", "int8", {"block_size": 32})
    assert a != artifacts.entry_key("other", "int4", {"block_size": 32})
    monkeypatch.setattr(artifacts, "library_versions", lambda: {"onnxruntime": "0.0"})
    assert a != artifacts.entry_key("model", "int4", {"block_size": 32})


@pytest.mark.parametrize("damage", ["truncated graph", "garbled graph", "garbled manifest", "no manifest"])
def test_corrupt_cache_entry_is_rebuilt(tiny_model, onnx_cache, damage):
    backend = OnnxRuntimeBackend("int4", {"threads": 2, "int4_block_size": 16})
    directory = Path(backend.load(tiny_model).preparation.artifact_dir)
    backend.close()
    model = directory / "model.onnx"
    if damage == "truncated graph":
        model.write_bytes(model.read_bytes()[:1000])
    elif damage == "garbled graph":  # same size, so only loading it can tell
        model.write_bytes(b"\x07garbage" * (model.stat().st_size // 8) + b"x" * (model.stat().st_size % 8))
    elif damage == "garbled manifest":
        (directory / "manifest.json").write_text("{not json")
    else:
        (directory / "manifest.json").unlink()
    rebuilt = OnnxRuntimeBackend("int4", {"threads": 2, "int4_block_size": 16})
    with pytest.warns(UserWarning, match="corrupt"):
        report = rebuilt.load(tiny_model)
    assert report.preparation.cache_hit is False and report.details["cache_rebuilt"]
    assert json.loads((directory / "manifest.json").read_text())["artifact_bytes"] == report.preparation.artifact_bytes
    assert rebuilt.loglikelihood([WINDOW])[0].shape == (WINDOW.n_scored,)
    rebuilt.close()


def test_export_failure_is_a_clear_error(tmp_path, onnx_cache):
    checkpoint = tmp_path / "broken"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    spec = ModelSpec(str(checkpoint), "local", str(checkpoint))
    with pytest.raises(BackendError, match="onnx export of broken failed") as caught:
        OnnxRuntimeBackend("fp32").load(spec)
    assert "\n" not in str(caught.value)
    leftovers = [p for p in (onnx_cache / "onnx").iterdir() if p.name.startswith("broken")]
    assert leftovers == []  # no half-built entry is left to be trusted later


# --- quantized variants -----------------------------------------------------------------------
def test_int8_quantizes_matmuls_and_honours_exclusions(fp32, tiny_model):
    _, fp32_report = fp32
    everything = OnnxRuntimeBackend("int8", {"threads": 2, "int8_exclude": "none"})
    report = everything.load(tiny_model)
    graph = Path(report.preparation.artifact_dir) / "model.onnx"
    assert "MatMulInteger" in ops(graph) and "DynamicQuantizeLinear" in ops(graph)
    assert report.weight_bytes < fp32_report.weight_bytes
    assert report.preparation.quantize_s > 0 and report.preparation.export_s == fp32_report.preparation.export_s
    assert report.details["export_done_now"] is False  # quantized from the cached fp32 export
    out = everything.generate(PROMPTS, 3, min_new_tokens=3)
    assert [len(t) for t in out.token_ids] == [3, 3]
    logprobs = everything.loglikelihood([WINDOW])[0]
    assert np.all(np.isfinite(logprobs)) and np.all(logprobs <= 0)
    everything.close()

    partial = OnnxRuntimeBackend("int8", {"threads": 2, "int8_exclude": "/mlp/down_proj/"})
    graph = Path(partial.load(tiny_model).preparation.artifact_dir) / "model.onnx"
    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    kept = [n.name for n in nodes if n.op_type == "MatMul" and "down_proj" in n.name]
    assert len(kept) == 2  # one per layer stays fp32
    assert not any("down_proj" in n.name for n in nodes if n.op_type == "MatMulInteger")
    assert any("q_proj" in n.name for n in nodes if n.op_type == "MatMulInteger")
    assert partial.info()["quantization"]["per_channel"] is True
    partial.close()


def test_int4_is_matmulnbits(fp32, tiny_model, hf):
    _, fp32_report = fp32
    backend = OnnxRuntimeBackend("int4", {"threads": 2})
    report = backend.load(tiny_model)
    graph = Path(report.preparation.artifact_dir) / "model.onnx"
    assert "MatMulNBits" in ops(graph)
    # The decoder layers' projections go from 32 to about 5.1 bits a weight (4-bit codes, an fp32
    # scale and a 4-bit zero point per block of 32); the tied embedding / lm_head stays fp32.
    layer_bytes = sum(p.numel() * 4 for n, p in hf.model.named_parameters() if "proj" in n)
    saved = fp32_report.weight_bytes - report.weight_bytes
    assert 0.75 * layer_bytes < saved < layer_bytes
    assert backend.info()["quantization"]["block_size"] == 32
    ours = backend.loglikelihood([WINDOW])[0]
    reference = hf.loglikelihood([WINDOW])[0]
    assert 0 < np.abs(ours - reference).max() < 0.5  # quantized: different, but close
    assert len(backend.generate([PROMPTS[1]], 2).token_ids[0]) >= 1
    backend.close()


def test_int4_hqq_has_float_zero_points(fp32, tiny_model):
    backend = OnnxRuntimeBackend("int4", {"threads": 2, "int4_algorithm": "hqq"})
    report = backend.load(tiny_model)
    graph = onnx.load(str(Path(report.preparation.artifact_dir) / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) >= 4 and n.input[3] for n in nbits)  # zero points present
    zero_points = {t.name: t.data_type for t in graph.initializer}
    assert zero_points[nbits[0].input[3]] == onnx.TensorProto.FLOAT
    assert backend.info()["quantization"]["algorithm"] == "hqq"
    assert np.all(np.isfinite(backend.loglikelihood([WINDOW])[0]))
    backend.close()


# --- end to end on SmolLM2 and the shared data ---------------------------------------------------
@pytest.mark.e2e
def test_smollm2_perplexity_fp32_matches_hf_and_int8_int4_stay_close(data_dir):
    from backends.models import load_tokenizer, resolve_model

    spec = resolve_model("smollm2-135m")
    text = (data_dir / "wikitext-2-raw-v1" / "test.txt").read_text()
    window = ScoringWindow(tuple(load_tokenizer(spec)(text, add_special_tokens=False)["input_ids"][:1024]), 0)

    def ppl(backend) -> float:
        backend.load(spec)
        try:
            return float(np.exp(-backend.loglikelihood([window])[0].mean()))
        finally:
            backend.close()

    reference = ppl(TransformersBackend("fp32"))
    onnx_fp32 = ppl(OnnxRuntimeBackend("fp32"))
    assert abs(onnx_fp32 / reference - 1) < 0.005
    int8 = ppl(OnnxRuntimeBackend("int8"))
    assert 0.99 < int8 / onnx_fp32 < 1.03  # per-tensor, all layers would be about +60% here
    int4 = ppl(OnnxRuntimeBackend("int4"))
    assert 0.99 < int4 / onnx_fp32 < 1.25


def test_quantizer_import_leaves_root_logging_alone():
    import logging

    from backends.onnx.quantize import _root_logging_untouched

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with _root_logging_untouched():
        logging.basicConfig(level=logging.INFO)  # what onnxruntime's matmul_nbits_quantizer does
    assert (list(root.handlers), root.level) == before
