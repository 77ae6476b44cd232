"""`taps bench` end to end at toy size: every row is measured, written and formatted."""

import json
import re

import pytest

from pipeline.bench import BenchSettings, run_bench


@pytest.mark.slow
def test_bench_measures_every_row_in_one_run(tmp_path):
    # --quick: every row at toy size, one process (inline loader), 16 images, one round
    text, r = run_bench(BenchSettings(quick=True, out=tmp_path / "bench", features_root=str(tmp_path / "no_features"),
                                      runtimes=("openvino",)), log=lambda _: None)
    assert r["images"] == "16 synthetic 500x375 JPEGs" and r["weights"] != ""
    rates = [r["ceiling"], r["pipeline"], r["seed_style"], *(x[k] for x in r["runtimes"].values()
                                                             for k in ("ceiling", "pipeline")), *(a["rate"] for a in r["ablations"].values()),
             *(v for k, v in r["early_tap"].items() if not k.endswith("ratio"))]
    assert all(rate > 0 for rate in rates)
    assert 0 < r["pipeline/ceiling"] and r["early_tap"]["forward_time_ratio"] > 0
    # the pipeline's time per image, split into the forward alone, decoding alone and the rest, adds up
    assert r["decode"] > 0
    ms = [float(v) for v in re.findall(r"([+-]?\d+\.\d+)(?: ms)?", text.split("torch pipeline per image ")[1].splitlines()[0])]
    assert ms[0] == pytest.approx(ms[1] + ms[2] + ms[3], abs=0.02)
    assert ms[2] == pytest.approx(1000 / r["decode"], abs=0.01)
    # the headline references run before and after what they are compared with; their rate is the mean
    assert set(r["bracketing_rates"]) == {"ceiling", "ceiling:openvino", "ceiling:openvino int8", "forward_full",
                                          "pipeline_full"}
    (before, after), = r["bracketing_rates"]["ceiling"]
    assert r["runtimes"]["torch"]["ceiling"] == pytest.approx((before + after) / 2)
    assert len(r["rates_per_round"]["pipeline"]) == 1
    # torch and each runtime asked for are rows (openvino also int8, calibrated on the bench's images); the
    # ceiling is the fastest forward, pipeline/ceiling that runtime's
    assert list(r["runtimes"]) == ["torch", "openvino", "openvino int8"]
    assert r["runtimes"]["openvino int8"]["precision"] == "int8"
    fastest = max(r["runtimes"], key=lambda name: r["runtimes"][name]["ceiling"])
    assert r["fastest_runtime"] == fastest and r["ceiling"] == r["runtimes"][fastest]["ceiling"]
    assert r["pipeline/ceiling"] == r["runtimes"][fastest]["pipeline/ceiling"]
    assert r["runtimes"]["openvino"]["precision"] == r["runtimes"]["torch"]["precision"] == r["precision"]
    assert all(f"\n{name} ({x['precision']})" in text for name, x in r["runtimes"].items())
    assert f"ceiling = the fastest forward ({fastest})" in text
    assert "NCHW instead of channels_last" in r["ablations"] and "eager" not in r  # compile off: no eager rows
    assert r["loader"] == "inline" and "one decode thread" in r["ablations"]  # quick: one process
    assert set(r["rss_mb"]) == {"16", "32"} and all(v > 0 for v in r["rss_mb"].values())
    assert set(r["page_faults"]) == {"default", "kept"} and "page faults per 64 MB batch" in text
    assert list(r["startup_seconds"]) == ["taps --help", "taps extract, 10 images (torch)",
                                          "taps extract, 10 images (--runtime auto)", "taps info FILE"]
    assert 0 < r["startup_seconds"]["taps --help"] < r["startup_seconds"]["taps extract, 10 images (torch)"]
    assert "start-up (wall seconds" in text
    # a repeated `taps extract --runtime auto` over the same images, start-up included, against seed-style
    # (the first run with an empty cache also exports and times every runtime: the one-time cost)
    e2e = r["end_to_end_seconds"]
    assert e2e["first"] > e2e["repeated"] > r["startup_seconds"]["taps --help"]
    assert f"16 images in {e2e['repeated']:.1f} s" in text and f"keeps them: {e2e['first']:.1f} s" in text
    assert "end to end/seed-style = " in text
    assert r["stage_two"]["source"].endswith("(--quick)") and r["stage_two"]["svm"]["seconds"] > 0
    saved = (tmp_path / "bench" / "bench.txt").read_text()
    assert saved.strip() == text and "pipeline/ceiling = " in text and "pipeline/seed-style = " in text
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["pipeline"] == r["pipeline"]
