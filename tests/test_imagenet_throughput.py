"""The vision throughput benchmark script: one real measurement, and the ratios and report it writes."""

from __future__ import annotations

import pytest

from experiments.vision_throughput import least_contended, measure, ratio_rows, render_markdown


def record(attention: str, size: int, train: float, infer: float, train_mib: float, infer_mib: float) -> dict:
    """Wall-clock speeds as given; CPU speeds twice as high (as with two busy threads)."""
    def mode(speed, mib):
        return {"images_per_s": speed, "images_per_cpu_s": 2 * speed, "times_s": [1.0], "cpu_s": [0.5], "peak_mib": mib}

    return {"attention": attention, "image_size": size, "training": mode(train, train_mib),
            "inference": mode(infer, infer_mib)}


def test_ratios_compare_flow_with_softmax_at_each_size():
    records = [record("flow", 224, 4.0, 10.0, 100, 50), record("softmax", 224, 2.0, 5.0, 400, 100),
               record("flow", 512, 1.0, 3.0, 200, 80), {"attention": "softmax", "image_size": 512, "error": "OOM"}]
    assert ratio_rows(records, "images_per_cpu_s") == [[224, "2.00x", "4.00x", "2.00x", "2.00x"]]
    report = {"records": records, "command": "python -m experiments.vision_throughput", "started_at": "t",
              "wall_s": 1.0, "git_sha": "abc",
              "settings": {"device": "cpu", "batch": 2, "repeats": 3, "warmup": 1, "rounds": 1, "threads": 1},
              "machine": {"cpu_count": 2, "platform": "linux", "torch": "2"}}
    markdown = render_markdown(report)
    ratios = next(line for line in markdown.splitlines() if "4.00x" in line)
    assert [cell.strip() for cell in ratios.strip("|").split("|")] == ["224", "2.00x", "4.00x", "2.00x", "2.00x"]
    assert "OOM" in markdown  # a failed configuration is listed, not dropped


def test_each_mode_keeps_its_least_contended_round():
    config = {"attention": "flow", "image_size": 224}
    rounds = [record("flow", 224, 4.0, 5.0, 100, 50), record("flow", 224, 3.0, 9.0, 110, 40), {**config, "error": "x"}]
    best = least_contended(config, rounds, "images_per_cpu_s")
    assert (best["training"]["images_per_s"], best["inference"]["images_per_s"]) == (4.0, 9.0)
    assert best["rounds"] == rounds and "error" in least_contended(config, rounds[2:], "images_per_cpu_s")


@pytest.mark.slow
def test_one_configuration_is_measured_in_process():
    config = {"attention": "flow", "image_size": 32, "batch": 2, "device": "cpu", "warmup": 1, "repeats": 1,
              "threads": 1}
    result = measure(config)
    for mode in ("training", "inference"):
        assert result[mode]["images_per_s"] > 0 and result[mode]["images_per_cpu_s"] > 0
        assert result[mode]["peak_mib"] >= 0 and len(result[mode]["times_s"]) == len(result[mode]["cpu_s"]) == 1
