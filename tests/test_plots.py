"""The report's figures, drawn from a small fixed results file (real records from the four
recipes' CPU runs, trimmed of per-token samples): every figure renders, its CSV holds the data it
draws, colours are per backend variant, and the Pareto frontier is right."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from reports.plots import FIGURES, Styles, latency_frame, pareto_front, plot_all
from reports.records import read_records

FIXTURE = Path(__file__).resolve().parent / "data" / "sweep-results.jsonl"


@pytest.fixture(scope="module")
def records():
    return read_records(FIXTURE)


@pytest.fixture(scope="module")
def figures(records, tmp_path_factory):
    return {f.png.stem: f for f in plot_all(records, tmp_path_factory.mktemp("figures"))}


def test_every_figure_renders_from_a_fixed_results_file_with_its_csv_beside_it(figures):
    import matplotlib.image

    assert set(figures) == {draw.__name__ for _, draw, _ in FIGURES}
    for figure in figures.values():
        height, width = matplotlib.image.imread(figure.png).shape[:2]
        assert height > 300 and width > 500, figure.png
        assert figure.csv.parent == figure.png.parent and len(pd.read_csv(figure.csv)) > 0


def test_prompt_length_csv_holds_every_batch_1_latency_cell_it_draws(records, figures):
    data = pd.read_csv(figures["rates_vs_prompt_length"].csv)
    cells = [r for r in records if r["workload"] == "latency" and r["status"] == "ok" and r["params"]["batch"] == 1]
    assert len(data) == len(cells)
    one = cells[0]
    row = data[(data["label"] == one["label"]) & (data["n_in"] == one["params"]["n_in"])].iloc[0]
    assert row["ttft_ms"] == pytest.approx(one["metrics"]["ttft_ms"]["median"])
    assert row["ttft_ms_std"] == pytest.approx(one["metrics"]["ttft_ms"]["std"])


def test_sliding_window_figure_has_a_point_per_format_prompt_window_and_sink(records, figures):
    data = pd.read_csv(figures["latency_vs_sliding_window"].csv)
    expected = {(f"{r['backend']}:{r['variant']}", r["params"]["n_in"], r["options"]["sliding_window"],
                 r["options"]["attention_sink"]) for r in records
                if r["workload"] == "latency" and r["status"] == "ok" and "sliding_window" in (r.get("options") or {})
                and r["params"]["batch"] == 1}
    assert set(map(tuple, data[["series", "n_in", "sliding_window", "attention_sink"]].values.tolist())) == expected
    assert data["sliding_window"].nunique() >= 2 and data["attention_sink"].nunique() >= 2


def test_throughput_per_sequence_is_the_aggregate_divided_by_the_batch(figures):
    data = pd.read_csv(figures["throughput_vs_batch"].csv)
    assert data["batch"].nunique() >= 2
    assert (data["decode_tok_s_per_seq"] * data["batch"]).tolist() == pytest.approx(data["decode_tok_s"].tolist())


def test_speed_vs_perplexity_marks_the_pareto_frontier(figures):
    data = pd.read_csv(figures["speed_vs_perplexity"].csv)
    front = set(pareto_front(list(zip(data["decode_tok_s"], data["ppl"]))))
    for row in data.itertuples():
        beaten = any(o.decode_tok_s >= row.decode_tok_s and o.ppl <= row.ppl and
                     (o.decode_tok_s, o.ppl) != (row.decode_tok_s, row.ppl) for o in data.itertuples())
        assert row.pareto == (not beaten) == ((row.decode_tok_s, row.ppl) in front)


def test_pareto_front_keeps_only_points_nothing_beats_on_both_axes():
    points = [(10.0, 20.0), (20.0, 25.0), (15.0, 30.0), (5.0, 19.0), (20.0, 26.0)]
    # (15, 30) is beaten by (20, 25); (20, 26) by (20, 25)
    assert pareto_front(points) == [(5.0, 19.0), (10.0, 20.0), (20.0, 25.0)]


def test_one_colour_per_backend_variant_and_one_marker_per_label(records):
    styles = Styles(records)
    frame = latency_frame(records)
    tagged = frame[frame["tag"] != ""].drop_duplicates("label")
    assert tagged["series"].duplicated().any()  # one variant under several option points
    for series, labels in tagged.groupby("series")["label"]:
        lines = [styles.line(label, series) for label in labels]
        assert len({line["color"] for line in lines}) == 1
        assert len({line["marker"] for line in lines}) == len(lines)
    series = sorted(frame["series"].unique())
    assert len({styles.colour(s) for s in series}) == len(series)


def test_a_figure_without_enough_points_is_left_out(records, tmp_path):
    one_length = [r for r in records if r["workload"] == "latency" and r["params"]["n_in"] == 256
                  and r["params"]["batch"] == 1]
    made = {f.png.stem for f in plot_all(one_length, tmp_path)}
    assert "rates_vs_prompt_length" not in made and "throughput_vs_batch" not in made
    assert not (tmp_path / "rates_vs_prompt_length.png").exists()
