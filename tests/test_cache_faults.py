"""Fault injection on the four on-disk caches (converted checkpoint, ONNX graphs, MLC/TVM artifacts,
llama.cpp GGUF files): an entry is built by a real load of the tiny model, damaged on disk for
real (truncated, overwritten with garbage of the same size, deleted), and the next load must
notice, say why, rebuild it and give exactly the first load's tokens and log-probabilities.
Entries written before manifests are adopted, not rebuilt. Each cache lives in a temporary folder;
the ONNX, MLC and llama.cpp tests read the tiny checkpoint from the shared cache, the checkpoint
tests build their own."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from backends import artifact_cache, models
from backends.artifact_cache import SAMPLE_BYTES, CacheRebuildWarning, sample_offsets
from backends.base import ScoringWindow, backend_class, variant_availability

PROMPT = [785, 3575, 282, 4649, 314, 198, 28, 1675, 1017, 42]
WINDOW = ScoringWindow(tuple(range(500, 548)), 5)
FAULTS = ("truncated", "garbage", "missing")
# what the manifest check says about each fault (the test fails if the check did not find it)
REASONS = {"truncated": "bytes, the manifest says", "garbage": "differs from the manifest", "missing": "is missing"}


def damage(path: Path, fault: str) -> None:
    """Damage ``path`` on disk: cut to half its size, overwrite every byte with random bytes of the
    same size, or delete it."""
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif fault == "garbage":
        size = path.stat().st_size
        path.write_bytes(np.random.default_rng(7).bytes(size))
        assert path.stat().st_size == size
    else:
        path.unlink()


def outputs(backend) -> tuple[list, np.ndarray]:
    """Greedy tokens of one prompt and the log-probabilities of one scoring window."""
    tokens = backend.generate([PROMPT], 8, min_new_tokens=8).token_ids
    return tokens, backend.loglikelihood([WINDOW])[0]


def load(name: str, variant: str, model, **options):
    """``(report, outputs, CacheRebuildWarning lines)`` of a fresh load of ``name:variant``."""
    backend = backend_class(name)(variant, {"threads": 2, **options})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = backend.load(model)
    try:
        result = outputs(backend)
    finally:
        backend.close()
    return report, result, [str(w.message) for w in caught if issubclass(w.category, CacheRebuildWarning)]


def assert_rebuilt(report, notes: list[str], reason: str, result, first, hit_field: bool = True) -> None:
    """The load said why it rebuilt (warning and ``details``: one line holding every ``|``-separated
    part of ``reason``), missed the cache, and matches ``first``."""
    assert len(notes) == 1 and all(part in notes[0] for part in reason.split("|")), notes
    assert report.details["cache_rebuilt"] == notes[0]
    if hit_field:
        assert report.preparation.cache_hit is False
    assert result[0] == first[0]
    np.testing.assert_array_equal(result[1], first[1])


def assert_hit(report, notes: list[str], result, first) -> None:
    assert notes == [] and "cache_rebuilt" not in report.details
    assert report.preparation.cache_hit in (True, None)
    assert result[0] == first[0]
    np.testing.assert_array_equal(result[1], first[1])


# --- the converted checkpoint -----------------------------------------------------------------
def first_build_in_own_cache(tmp_path_factory, module, name: str, variant: str, tiny_model):
    """For a module-scoped fixture: ``module.cache_root`` pointed at a fresh folder, one load of
    ``name:variant`` that builds the entry there (no rebuild notes), then ``(entry dir, outputs)``
    yielded; skipped where the variant is unavailable."""
    availability = variant_availability(name, variant)
    if not availability.ok:
        pytest.skip(availability.reason)
    root = tmp_path_factory.mktemp(f"{name}-cache")
    patch = pytest.MonkeyPatch()
    patch.setattr(module, "cache_root", lambda: root)
    report, first, notes = load(name, variant, tiny_model)
    assert report.preparation.cache_hit is False and notes == []
    yield Path(report.preparation.artifact_dir), first
    patch.undo()


@pytest.fixture(scope="module")
def own_checkpoints(tmp_path_factory, tiny_model):
    """A private cache root: the tiny checkpoint is built there (its tokenizer read from the shared
    cache's SmolLM2 checkpoint), and the first hf load's outputs recorded."""
    stand_in = models.checkpoint_dir(models.resolve_model(models.EMBEDDED_MODEL))
    patch = pytest.MonkeyPatch()
    patch.setenv("QUANTARENA_CACHE", str(tmp_path_factory.mktemp("cache")))
    patch.setattr(models, "stand_in_tokenizer_dir", lambda: stand_in)
    report, first, notes = load("hf", "fp32", tiny_model)
    assert notes == []
    yield models.checkpoint_dir(tiny_model), first
    patch.undo()


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_checkpoint_weights_are_converted_again(own_checkpoints, tiny_model, fault):
    directory, first = own_checkpoints
    damage(directory / "model.safetensors", fault)
    report, result, notes = load("hf", "fp32", tiny_model)
    assert_rebuilt(report, notes, f"model.safetensors|{REASONS[fault]}", result, first, hit_field=False)
    assert "converted checkpoint" in notes[0]
    assert models.checkpoint_entry(directory).check()[0] is not None


def test_checkpoint_tokenizer_with_one_byte_changed_is_converted_again(own_checkpoints, tiny_model):
    directory, first = own_checkpoints
    path = directory / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # small files are hashed whole: one bit is enough
    path.write_bytes(bytes(data))
    report, result, notes = load("hf", "fp32", tiny_model)
    assert_rebuilt(report, notes, "tokenizer.json differs from the manifest", result, first, hit_field=False)


def test_checkpoint_without_done_json_is_converted_again(own_checkpoints, tiny_model):
    directory, first = own_checkpoints
    (directory / models.DONE).unlink()
    report, result, notes = load("hf", "fp32", tiny_model)
    assert_rebuilt(report, notes, "no manifest done.json", result, first, hit_field=False)


def test_checkpoint_from_before_manifests_is_adopted(own_checkpoints, tiny_model):
    directory, first = own_checkpoints
    done = json.loads((directory / models.DONE).read_text())
    mtime = (directory / "model.safetensors").stat().st_mtime_ns
    (directory / models.DONE).write_text(json.dumps({"prepare_s": done["prepare_s"], "spec": done["spec"]}))
    report, result, notes = load("hf", "fp32", tiny_model)
    assert_hit(report, notes, result, first)
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime  # not converted again
    adopted = json.loads((directory / models.DONE).read_text())
    assert adopted["prepare_s"] == done["prepare_s"] and "model.safetensors" in adopted["files"]


# --- ONNX Runtime -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_first(tmp_path_factory, tiny_model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.exporters.onnx")
    from backends.onnx import artifacts

    yield from first_build_in_own_cache(tmp_path_factory, artifacts, "onnx", "fp32", tiny_model)


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_onnx_graph_is_exported_again(onnx_first, tiny_model, fault):
    directory, first = onnx_first
    damage(directory / "model.onnx", fault)
    report, result, notes = load("onnx", "fp32", tiny_model)
    assert_rebuilt(report, notes, f"model.onnx|{REASONS[fault]}", result, first)
    assert "onnx cache entry" in notes[0] and report.details["export_done_now"] is True


def test_onnx_entry_from_before_manifests_is_adopted(onnx_first, tiny_model):
    directory, first = onnx_first
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    old = {k: v for k, v in manifest.items() if k != "cache_manifest"}
    old["files"] = {name: record["bytes"] for name, record in manifest["files"].items()}
    path.write_text(json.dumps(old))  # the manifest as the previous version wrote it: sizes only
    report, result, notes = load("onnx", "fp32", tiny_model)
    assert_hit(report, notes, result, first)
    assert report.preparation.cache_hit is True
    assert json.loads(path.read_text())["files"]["model.onnx"]["sha256"]


# --- MLC / TVM --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlc_first(tmp_path_factory, tiny_model):
    pytest.importorskip("tvm")
    if not variant_availability("mlc", "q0f32").ok:
        pytest.skip(variant_availability("mlc", "q0f32").reason)
    cache = tmp_path_factory.mktemp("mlc-cache")
    report, first, notes = load("mlc", "q0f32", tiny_model, device="cpu", cache_dir=str(cache))
    assert report.preparation.cache_hit is False and notes == []
    return Path(report.preparation.artifact_dir), first, cache


@pytest.mark.parametrize("fault, name", [("truncated", "params.npz"), ("garbage", "params.npz"),
                                         ("garbage", "lib.so"), ("missing", "lib.so")])
def test_damaged_mlc_artifact_is_compiled_again(mlc_first, tiny_model, fault, name):
    directory, first, cache = mlc_first
    damage(directory / name, fault)
    report, result, notes = load("mlc", "q0f32", tiny_model, device="cpu", cache_dir=str(cache))
    assert_rebuilt(report, notes, f"{name}|{REASONS[fault]}", result, first)
    assert "mlc cache entry" in notes[0] and report.preparation.compile_s > 0


def test_mlc_weights_damaged_between_sampled_blocks_fail_to_load_and_are_compiled_once_more(mlc_first, tiny_model):
    """Bytes the sampled digest does not read: the manifest passes, ``np.load`` fails the zip
    member's CRC, and ``Backend.load`` discards the entry and builds it again."""
    directory, first, cache = mlc_first
    path = directory / "params.npz"
    offsets = sample_offsets(path.stat().st_size)
    assert path.stat().st_size > artifact_cache.FULL_HASH_BYTES
    middle = (offsets[3] + SAMPLE_BYTES + offsets[4]) // 2
    with open(path, "r+b") as handle:
        handle.seek(middle)
        chunk = handle.read(16)
        handle.seek(middle)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    assert artifact_cache.CacheEntry(directory).check()[0] is not None  # invisible to the manifest
    report, result, notes = load("mlc", "q0f32", tiny_model, device="cpu", cache_dir=str(cache))
    assert_rebuilt(report, notes, "loading it raised", result, first)


def test_mlc_entry_from_before_manifests_is_adopted(mlc_first, tiny_model):
    directory, first, cache = mlc_first
    meta = json.loads((directory / "meta.json").read_text())
    del meta["manifest"]
    (directory / "meta.json").write_text(json.dumps(meta))
    (directory / "manifest.json").unlink()
    report, result, notes = load("mlc", "q0f32", tiny_model, device="cpu", cache_dir=str(cache))
    assert_hit(report, notes, result, first)
    assert report.preparation.cache_hit is True and (directory / "manifest.json").is_file()


def test_mlc_entry_of_this_version_without_its_manifest_is_compiled_again(mlc_first, tiny_model):
    directory, first, cache = mlc_first
    (directory / "manifest.json").unlink()
    report, result, notes = load("mlc", "q0f32", tiny_model, device="cpu", cache_dir=str(cache))
    assert_rebuilt(report, notes, "no manifest manifest.json", result, first)


# --- llama.cpp --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_first(tmp_path_factory, tiny_model):
    from backends.llamacpp import gguf_files

    yield from first_build_in_own_cache(tmp_path_factory, gguf_files, "llamacpp", "q8_0", tiny_model)


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_gguf_is_quantized_again(gguf_first, tiny_model, fault):
    directory, first = gguf_first
    damage(directory / "q8_0.gguf", fault)
    report, result, notes = load("llamacpp", "q8_0", tiny_model)
    assert_rebuilt(report, notes, f"q8_0.gguf|{REASONS[fault]}", result, first)
    assert "llama.cpp cache entry" in notes[0] and report.preparation.quantize_s > 0


def test_damaged_source_gguf_is_written_again_for_the_next_quantization(gguf_first, tiny_model):
    directory, first = gguf_first
    damage(directory / "source.gguf", "garbage")
    (directory / "q8_0.json").unlink()  # the variant must be built again, from the source
    report, result, notes = load("llamacpp", "q8_0", tiny_model)
    assert len(notes) == 2 and "no manifest q8_0.json" in notes[0] and REASONS["garbage"] in notes[1]
    assert "source.gguf" in notes[1] and report.preparation.cache_hit is False
    assert result[0] == first[0]
    np.testing.assert_array_equal(result[1], first[1])


def test_gguf_from_before_manifests_is_adopted(gguf_first, tiny_model):
    directory, first = gguf_first
    facts = json.loads((directory / "q8_0.json").read_text())
    (directory / "q8_0.json").write_text(json.dumps({k: facts[k] for k in ("convert_s", "quantize_s", "source")}))
    report, result, notes = load("llamacpp", "q8_0", tiny_model)
    assert_hit(report, notes, result, first)
    assert report.preparation.cache_hit is True
    assert json.loads((directory / "q8_0.json").read_text())["files"]["q8_0.gguf"]["hashed"] in ("all", "sampled")
