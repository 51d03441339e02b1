"""bitsandbytes on the tiny model: which 4-bit matmul kernel runs on CPU is recorded in info(),
and it is the one the library actually calls (spied on during a generation)."""

from __future__ import annotations

import collections
import importlib

import pytest

from backends.base import variant_availability
from backends.hf_bnb.backend import DEQUANTIZE, KERNELS_COMMUNITY, NATIVE_GEMV, BitsAndBytesBackend

pytestmark = pytest.mark.skipif(not variant_availability("bnb", "nf4").ok, reason="bitsandbytes is not installed")

PROMPT = [785, 3575, 282, 4649, 314, 198, 28, 1675]


@pytest.fixture(scope="module")
def nf4(tiny_model):
    backend = BitsAndBytesBackend("nf4", {"threads": 2, "device": "cpu"})
    backend.load(tiny_model)
    yield backend
    backend.close()


def test_nf4_info_names_the_cpu_matmul_kernel_the_library_calls(nf4, monkeypatch):
    path = nf4.info()["quantization"]["matmul_path"]
    assert path["kernel"] in (KERNELS_COMMUNITY, NATIVE_GEMV, DEQUANTIZE)
    assert path["layers_4bit"] == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays fp32

    cpu_ops = importlib.import_module("bitsandbytes.backends.cpu.ops")
    calls: collections.Counter = collections.Counter()
    native = cpu_ops.lib

    class NativeSpy:  # the real library; counts the 4-bit GEMV entry points looked up
        def __getattr__(self, name):
            if name.startswith("gemv_4bit_inference_cpu"):
                calls[NATIVE_GEMV] += 1
            return getattr(native, name)

    monkeypatch.setattr(cpu_ops, "lib", NativeSpy())
    community = getattr(cpu_ops, "gemm_4bit_forward_kernel", None)
    if community is not None:
        def spy(*args):
            calls[KERNELS_COMMUNITY] += 1
            return community(*args)

        monkeypatch.setattr(cpu_ops, "gemm_4bit_forward_kernel", spy)
    nf4.generate([PROMPT], 3, min_new_tokens=3)
    used = [kernel for kernel, n in calls.items() if n]
    assert used == ([] if path["kernel"] == DEQUANTIZE else [path["kernel"]])
    if path["kernel"] == DEQUANTIZE:
        assert path["packed_layers"] == 0 and path["activation_dtype"] is None
    else:
        assert path["packed_layers"] == path["layers_4bit"] and path["activation_dtype"] == "bfloat16"
        assert (path["note"] is None) == (path["kernel"] == KERNELS_COMMUNITY)

