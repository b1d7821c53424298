"""The efficiency benchmark harness (experiments/bench.py): its baselines, budgets, targets and a tiny real run."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch

from experiments import bench
from flowformer.attention.flow import flow_attention


def _inputs(length=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, length, 8, generator=generator, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_official_formulations_compute_flow_attention(causal):
    q, k, v = _inputs()
    official = bench.official_causal_flow if causal else bench.official_noncausal_flow
    torch.testing.assert_close(official(q, k, v), flow_attention(q, k, v, causal=causal), rtol=1e-10, atol=1e-12)


def test_materialised_baseline_really_builds_the_prefix_tensor():
    # the baseline must keep the official memory behaviour: peak temporaries of (B, H, L, d, dv)
    q, k, v = (t.float() for t in _inputs(length=64))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        bench.official_causal_flow(q, k, v)
    shapes = {tuple(tuple(s) for s in event.input_shapes if s) for event in prof.key_averages(group_by_input_shape=True)}
    assert any((2, 3, 64, 8, 8) in group for group in shapes)


def test_predict_extrapolates_with_a_clipped_exponent():
    assert bench._predict([], 1024) is None
    assert bench._predict([(256, 1.0)], 1024) == pytest.approx(4.0)  # one point: linear
    assert bench._predict([(256, 1.0), (512, 4.0)], 1024) == pytest.approx(16.0)  # quadratic
    assert bench._predict([(256, 1.0), (512, 1.1)], 1024) == pytest.approx(2.2)  # sub-linear is clipped to linear


class _FakeZygote:
    """Answers with a cost model instead of measuring: time and memory grow as L^2 for 'softmax', L otherwise."""

    calls: ClassVar[list[dict]] = []

    def __init__(self, load_fused: bool = False) -> None:
        pass

    def run(self, config, timeout):
        _FakeZygote.calls.append(config)
        scale = (config["length"] / 256) ** (2 if config["variant"].startswith("softmax") else 1)
        return {**config, "time_ms": 100.0 * scale, "peak_mib": 100.0 * scale, "gflops": 1.0, "wall_s": 0.0}

    def close(self) -> None:
        pass


def test_budgets_stop_a_variant_and_record_why(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "Zygote", _FakeZygote)
    _FakeZygote.calls = []
    args = bench.parse_args([
        "--lengths", "256,512,1024,2048,4096", "--variants", "flow,softmax", "--modes", "forward",
        "--time-budget", "1.0", "--memory-budget", "100", "--gemm-size", "0", "--no-figure", "--rounds", "1", "--out", str(tmp_path),
    ])
    results = bench.run_suite(args)
    measured = {(c["variant"], c["length"]) for c in _FakeZygote.calls}
    # softmax: 0.1 s, 0.4 s, 1.6 s (> 1 s budget: stops); flow: 0.1 ... 1.6 s at 4096 is run since 0.8 s < budget
    assert ("softmax", 1024) in measured and ("softmax", 2048) not in measured
    assert ("flow", 4096) in measured
    skipped = [r for r in results["records"] if "skipped" in r]
    assert {(r["variant"], r["length"]) for r in skipped} == {("softmax", 2048), ("softmax", 4096)}
    assert "time budget" in skipped[0]["skipped"]


def test_predicted_memory_over_budget_is_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "Zygote", _FakeZygote)
    _FakeZygote.calls = []
    args = bench.parse_args([
        "--lengths", "256,512,1024", "--variants", "softmax", "--modes", "forward", "--time-budget", "100",
        "--memory-budget", "0.9", "--gemm-size", "0", "--no-figure", "--rounds", "1", "--out", str(tmp_path),
    ])
    results = bench.run_suite(args)
    # 100 MiB at 256, 400 MiB at 512 -> predicted 1600 MiB at 1024, over 1.25 x 0.9 GiB
    assert [c["length"] for c in _FakeZygote.calls] == [256, 512]
    assert "predicted" in results["records"][-1]["skipped"]


class _NoisyZygote(_FakeZygote):
    """The first round of 'flow' is hit by a neighbour's burst of work (3x slower)."""

    def run(self, config, timeout):
        record = super().run(config, timeout)
        if config["variant"] == "flow" and len(_FakeZygote.calls) <= 2:
            record["time_ms"] *= 3
        return {**record, "timed_calls": 5, "times_ms": [record["time_ms"]]}


def test_later_rounds_keep_the_least_contended_median(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "Zygote", _NoisyZygote)
    _FakeZygote.calls = []
    args = bench.parse_args([
        "--lengths", "256,4096", "--variants", "flow", "--modes", "forward", "--gemm-size", "0", "--no-figure",
        "--rounds", "2", "--recheck-max", "1.0", "--out", str(tmp_path),
    ])
    records = bench.run_suite(args)["records"]
    # round 1: 300 ms (burst) and 1.6 s; round 2 re-times only the quick one, which now takes 100 ms
    assert [c["length"] for c in _FakeZygote.calls] == [256, 4096, 256]
    quick = next(r for r in records if r["length"] == 256)
    assert quick["round_medians_ms"] == [300.0, 100.0] and quick["time_ms"] == 100.0
    assert "round_medians_ms" not in next(r for r in records if r["length"] == 4096)


def test_every_measurement_is_saved_as_it_comes_and_a_killed_run_keeps_them(monkeypatch, tmp_path):
    class _KilledZygote(_FakeZygote):
        def run(self, config, timeout):
            if len(_FakeZygote.calls) == 3:
                raise KeyboardInterrupt  # the run is killed during its fourth measurement
            return super().run(config, timeout)

    monkeypatch.setattr(bench, "Zygote", _KilledZygote)
    _FakeZygote.calls = []
    args = bench.parse_args([
        "--lengths", "256,512,1024", "--variants", "flow,softmax", "--modes", "forward", "--gemm-size", "0",
        "--no-figure", "--rounds", "1", "--out", str(tmp_path), "--tag", "killed",
    ])
    with pytest.raises(KeyboardInterrupt):
        bench.run_suite(args)
    saved = json.loads((tmp_path / "killed.partial.json").read_text())
    assert [(r["variant"], r["length"]) for r in saved["records"]] == [("flow", 256), ("softmax", 256), ("flow", 512)]
    assert saved["settings"]["lengths"] == [256, 512, 1024]
    # the partial file renders like a finished run
    assert bench.main(["--from-json", str(tmp_path / "killed.partial.json"), "--out", str(tmp_path), "--no-figure"]) == 0
    assert "| 512 |" in (tmp_path / "killed.partial.md").read_text()


def _record(variant, mode, length, time_ms, peak_mib, gflops=None):
    return {"variant": variant, "mode": mode, "dtype": "float32", "length": length, "time_ms": time_ms,
            "peak_mib": peak_mib, "gflops": gflops}


def test_targets_are_computed_from_the_run():
    records = [
        _record("gemm", "forward", 1024, 1.0, 0.0, gflops=90.0),
        _record("flow_causal", "backward", 4096, 100.0, 100.0),
        _record("flow_causal_materialised", "backward", 4096, 2000.0, 3000.0),
        _record("flow_causal", "forward", 65536, 500.0, 2048.0, gflops=30.0),
        _record("flow_causal", "forward", 4096, 30.0, 60.0, gflops=40.0),
        _record("flow_causal", "forward", 16384, 150.0, 240.0, gflops=20.0),
        _record("flow", "forward", 4096, 10.0, 40.0, gflops=50.0),
        _record("flow_official", "forward", 4096, 20.0, 40.0),
        _record("softmax", "forward", 4096, 100.0, 10.0),
    ]
    results = {"records": records, "settings": {"dtypes": ["float32"]}}
    targets = {t["target"]: t for t in bench.evaluate_targets(results)}
    speed = targets["causal flow vs materialised cumsum, L=4096, fwd+bwd: speed-up"]
    assert speed["met"] is True and speed["measured"].startswith("20.0x")
    assert targets["causal flow vs materialised cumsum, L=4096, fwd+bwd: memory"]["met"] is True
    assert targets["causal flow, L=65536, forward: peak memory"]["met"] is True
    assert targets["flow_causal, forward: time(16384)/time(4096)"]["met"] is False  # 5.0 > 4.5
    assert targets["flow vs official einsum, forward: L >= 4096"]["met"] is True
    assert targets["flow overtakes softmax SDPA (forward) from L ="]["measured"] == "4096"
    ceiling = next(t for name, t in targets.items() if name.startswith("flow_causal forward, matmul FLOPs"))
    assert ceiling["met"] is False  # 90 / 20 > 3


def test_tiny_real_run_writes_json_table_and_figure(tmp_path):
    figure = tmp_path / "figure.png"
    code = bench.main([
        "--lengths", "64,128", "--variants", "flow,flow_causal,flow_causal_materialised,matmul",
        "--repeats", "1", "--min-repeats", "1", "--min-time", "0", "--warmup", "0", "--warmup-length", "32",
        "--rounds", "1",
        "--gemm-size", "64", "--out", str(tmp_path), "--figure", str(figure), "--tag", "tiny",
    ])
    assert code == 0
    results = json.loads((tmp_path / "tiny.json").read_text())
    assert results["allocator_env"] == bench.ALLOCATOR_ENV
    assert results["machine"]["torch"] == torch.__version__
    measured = [r for r in results["records"] if "time_ms" in r]
    assert not [r for r in results["records"] if "error" in r]
    # 3 variants x 2 modes x 2 lengths + matmul (forward only) x 2 lengths + the GEMM before and after
    assert len(measured) == 3 * 2 * 2 + 2 + 2
    assert all(r["time_ms"] > 0 and r["peak_mib"] >= 0 for r in measured)
    table = (tmp_path / "tiny.md").read_text()
    assert "## Targets" in table and "| 128 |" in table and "flow_causal_materialised" in table
    assert figure.stat().st_size > 10_000


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown variant 'flow_turbo'"):
        bench.parse_args(["--variants", "flow_turbo"])
