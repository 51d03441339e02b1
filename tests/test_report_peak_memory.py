"""The device-peak column of the report: on a CUDA record it is the CUDA allocator peak or "-",
never the host RSS, which keeps its own column. Constructed records, no run."""

from __future__ import annotations

from reports.table import LATENCY_COLUMNS, MB, latency_rows, peak_bytes, summary_rows


def _latency_record(device: str, **memory: int) -> dict:
    timing = {"median": 10.0, "p90": 11.0, "std": 0.5}
    return {"label": f"x:{device}", "backend": "x", "variant": device, "workload": "latency", "status": "ok",
            "params": {"n_in": 8, "n_out": 4, "batch": 1},
            "metrics": {key: timing for key in ("ttft_ms", "tpot_ms", "itl_ms", "prefill_tok_s",
                                                "decode_tok_s", "e2e_ms")} | memory,
            "info": {"device": device, "quantization": {"format": "f"}},
            "load": {"weight_bytes": 100 * MB, "load_s": 1.0}}


def _columns(record: dict) -> dict[str, str]:
    return dict(zip(LATENCY_COLUMNS, latency_rows([record])[0]))


def test_cuda_record_without_allocator_bytes_shows_a_dash_not_host_rss():
    record = _latency_record("cuda", peak_rss_bytes=900 * MB, peak_cuda_allocated_bytes=0)
    assert peak_bytes(record["metrics"], record["info"]) is None
    assert summary_rows([record])[0].peak_mb.render() == "-"
    columns = _columns(record)
    assert columns["peak MB"] == "-" and columns["host RSS MB"] == "900"
    missing = _latency_record("cuda", peak_rss_bytes=900 * MB)  # no allocator figure at all
    assert peak_bytes(missing["metrics"], missing["info"]) is None and _columns(missing)["peak MB"] == "-"


def test_cuda_record_shows_the_allocator_peak_and_host_rss_beside_it():
    record = _latency_record("cuda", peak_rss_bytes=900 * MB, peak_cuda_allocated_bytes=300 * MB)
    assert peak_bytes(record["metrics"], record["info"]) == 300 * MB
    assert summary_rows([record])[0].peak_mb.render() == "300"
    columns = _columns(record)
    assert (columns["peak MB"], columns["host RSS MB"]) == ("300", "900")


def test_cpu_record_device_peak_is_the_process_rss():
    record = _latency_record("cpu", peak_rss_bytes=500 * MB)
    assert peak_bytes(record["metrics"], record["info"]) == 500 * MB
    columns = _columns(record)
    assert (columns["peak MB"], columns["host RSS MB"]) == ("500", "500")


def test_model_memory_on_cuda_is_what_the_allocator_gained_not_host_rss():
    """Measured on an H100: an 8B fp16 model added 16.1 GB to the CUDA allocator and 0.7 GB of host
    RSS (libraries, CUDA context); resident MB and "model memory saved" must be the 16.1 GB."""
    from reports.baseline import relative_rows

    def cuda_record(label: str, host: int, device: int) -> dict:
        record = _latency_record("cuda", peak_rss_bytes=900 * MB, peak_cuda_allocated_bytes=device + 50 * MB)
        record["label"] = label
        record["load"].update(model_resident_bytes=host, model_resident_cuda_allocated_bytes=device)
        return record

    base, quantized = cuda_record("hf:fp16", 734 * MB, 16000 * MB), cuda_record("bnb:nf4", 650 * MB, 6000 * MB)
    assert summary_rows([base])[0].resident_mb.render() == "16000"
    saved = {row.label: row.resident_saving_pct for row in relative_rows([base, quantized], "hf:fp16")}
    assert round(saved["bnb:nf4"], 1) == 62.5  # 1 - 6000/16000, not 1 - 650/734 (11.4%)
    cpu = _latency_record("cpu", peak_rss_bytes=500 * MB)
    cpu["load"].update(model_resident_bytes=300 * MB)
    assert summary_rows([cpu])[0].resident_mb.render() == "300"
