"""The efficiency benchmark (experiments/bench): its baselines, schedule and budgets, process isolation, report and
targets, and a tiny real run."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.bench import isolation, measure, report, runner, targets
from flowformer.attention import flow_attention
from flowformer.attention.reference import official_causal_flow, official_noncausal_flow
from tests.helpers import random_qkv


@pytest.mark.parametrize("causal", [False, True])
def test_official_formulations_compute_flow_attention(causal):
    q, k, v = random_qkv(2, 3, 40, 8)
    official = official_causal_flow if causal else official_noncausal_flow
    torch.testing.assert_close(official(q, k, v), flow_attention(q, k, v, causal=causal), rtol=1e-10, atol=1e-12)


def test_materialised_baseline_really_builds_the_prefix_tensor():
    # the baseline must keep the official memory behaviour: peak temporaries of (B, H, L, d, dv)
    q, k, v = (t.float() for t in random_qkv(2, 3, 64, 8))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        official_causal_flow(q, k, v)
    events = prof.key_averages(group_by_input_shape=True)
    shapes = {tuple(tuple(s) for s in event.input_shapes if s) for event in events}
    assert any((2, 3, 64, 8, 8) in group for group in shapes)


def test_predict_extrapolates_with_a_clipped_exponent():
    assert runner.predict([], 1024) is None
    assert runner.predict([(256, 1.0)], 1024) == pytest.approx(4.0)  # one point: linear
    assert runner.predict([(256, 1.0), (512, 4.0)], 1024) == pytest.approx(16.0)  # quadratic
    assert runner.predict([(256, 1.0), (512, 1.1)], 1024) == pytest.approx(2.2)  # sub-linear is clipped to linear


class FakeIsolation:
    """Answers with a cost model instead of measuring: time and memory grow as L^2 for 'softmax', L otherwise."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def run(self, config, timeout):
        self.calls.append(config)
        scale = (config["length"] / 256) ** (2 if config["variant"].startswith("softmax") else 1)
        return {**config, "time_ms": 100.0 * scale, "peak_mib": 100.0 * scale, "gflops": 1.0, "wall_s": 0.0,
                "timed_calls": 5, "times_ms": [100.0 * scale]}


def _args(tmp_path, *extra):
    return runner.parse_args(["--gemm-size", "0", "--no-figure", "--rounds", "1", "--modes", "forward",
                              "--quiet-budget", "0", "--out", str(tmp_path), *extra])


def test_budgets_stop_a_variant_and_record_why(tmp_path):
    fake = FakeIsolation()
    args = _args(tmp_path, "--lengths", "256,512,1024,2048,4096", "--variants", "flow,softmax", "--time-budget", "1.0",
                 "--memory-budget", "100")
    results = runner.run_suite(args, fake)
    measured = {(c["variant"], c["length"]) for c in fake.calls}
    # softmax: 0.1 s, 0.4 s, 1.6 s (> 1 s budget: stops); flow: 0.1 ... 1.6 s at 4096 is run since 0.8 s < budget
    assert ("softmax", 1024) in measured and ("softmax", 2048) not in measured
    assert ("flow", 4096) in measured
    skipped = [r for r in results["records"] if "skipped" in r]
    assert {(r["variant"], r["length"]) for r in skipped} == {("softmax", 2048), ("softmax", 4096)}
    assert "time budget" in skipped[0]["skipped"]


def test_the_configurations_of_the_targets_run_whatever_the_budgets(tmp_path):
    class Slow(FakeIsolation):  # the materialised baseline takes 10 s a call from the start
        def run(self, config, timeout):
            return {**super().run(config, timeout), "time_ms": 10_000.0}

    fake = Slow()
    args = _args(tmp_path, "--lengths", "1024,2048,4096,8192", "--variants", "flow_causal_materialised",
                 "--modes", "backward", "--time-budget", "5")
    runner.run_suite(args, fake)
    assert [c["length"] for c in fake.calls] == [1024, 4096]  # stopped after 1024, but 4096 is a target's


def test_predicted_memory_over_budget_is_skipped(tmp_path):
    fake = FakeIsolation()
    args = _args(tmp_path, "--lengths", "256,512,1024", "--variants", "softmax", "--time-budget", "100",
                 "--memory-budget", "0.9")
    results = runner.run_suite(args, fake)
    # 100 MiB at 256, 400 MiB at 512 -> predicted 1600 MiB at 1024, over 1.25 x 0.9 GiB
    assert [c["length"] for c in fake.calls] == [256, 512]
    assert "predicted" in results["records"][-1]["skipped"]


def test_later_rounds_keep_the_least_contended_median(tmp_path):
    class Noisy(FakeIsolation):  # the first round of 'flow' is hit by a neighbour's burst of work (3x slower)
        def run(self, config, timeout):
            record = super().run(config, timeout)
            if len(self.calls) <= 2:
                record["time_ms"] *= 3
            return record

    fake = Noisy()
    args = _args(tmp_path, "--lengths", "256,4096", "--variants", "flow", "--rounds", "2", "--recheck-max", "1.0")
    records = runner.run_suite(args, fake)["records"]
    # round 1: 300 ms (burst) and 1.6 s; round 2 re-times only the quick one, which now takes 100 ms
    assert [c["length"] for c in fake.calls] == [256, 4096, 256]
    quick = next(r for r in records if r["length"] == 256)
    assert quick["round_medians_ms"] == [300.0, 100.0] and quick["time_ms"] == 100.0
    assert "round_medians_ms" not in next(r for r in records if r["length"] == 4096)


def test_contended_timings_are_retimed_up_to_the_time_budget(tmp_path):
    class Busy(FakeIsolation):  # round 1 runs beside a neighbour: 2 s a call; later rounds on a quiet machine
        def run(self, config, timeout):
            record = super().run(config, timeout)
            busy = len(self.calls) <= 1
            return {**record, "time_ms": 2000.0 if busy else 300.0, "background_cpu": 0.6 if busy else 0.0}

    fake = Busy()
    args = _args(tmp_path, "--lengths", "256", "--variants", "flow", "--rounds", "2", "--recheck-max", "1.0")
    record = runner.run_suite(args, fake)["records"][0]
    assert len(fake.calls) == 2 and record["time_ms"] == 300.0 and record["background_cpu"] == 0.0


def test_every_measurement_is_saved_as_it_comes_and_a_killed_run_keeps_them(tmp_path):
    class Killed(FakeIsolation):
        def run(self, config, timeout):
            if len(self.calls) == 3:
                raise KeyboardInterrupt  # the run is killed during its fourth measurement
            return super().run(config, timeout)

    args = _args(tmp_path, "--lengths", "256,512,1024", "--variants", "flow,softmax", "--tag", "killed")
    with pytest.raises(KeyboardInterrupt):
        runner.run_suite(args, Killed())
    saved = json.loads((tmp_path / "killed.partial.json").read_text())
    assert [(r["variant"], r["length"]) for r in saved["records"]] == [("flow", 256), ("softmax", 256), ("flow", 512)]
    assert saved["settings"]["lengths"] == [256, 512, 1024]
    # the partial file renders like a finished run
    partial = str(tmp_path / "killed.partial.json")
    assert runner.main(["--from-json", partial, "--out", str(tmp_path), "--no-figure"]) == 0
    assert "| 512 |" in (tmp_path / "killed.partial.md").read_text()


def _record(variant, mode, length, time_ms, peak_mib, gflops=None):
    return {"variant": variant, "mode": mode, "dtype": "float32", "length": length, "time_ms": time_ms,
            "peak_mib": peak_mib, "gflops": gflops}


RECORDS = [
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


def test_targets_are_checked_against_the_run():
    found = {t.name: t for t in targets.evaluate({"records": RECORDS, "settings": {"dtypes": ["float32"]}})}
    speed = found["causal flow vs materialised official, L=4096, forward+backward: speed-up"]
    assert speed.met is False and speed.measured == "20.0x"  # below 30x
    assert found["causal flow vs materialised official, L=4096, forward+backward: memory"].met is True
    assert found["causal flow, L=65536, forward: peak memory"].met is True
    assert found["flow_causal, forward: time(16384)/time(4096)"].met is False  # 5.0 > 4.5
    assert found["flow vs official non-causal, forward, L >= 4096"].met is True
    assert found["flow, forward+backward: time(16384)/time(4096)"].met is None
    ceiling = next(t for name, t in found.items() if name.startswith("flow_causal forward: matmul"))
    assert ceiling.met is False  # 90 / 20 > 3


def test_the_report_shows_measurements_and_ratios_but_no_thresholds(tmp_path):
    results = {"command": "x", "wall_s": 1.0, "started_at": "now", "git_sha": "abc", "machine": {"torch": "t"},
               "worker_env": isolation.WORKER_ENV, "variants": {"flow": "", "flow_official": "", "softmax": ""},
               "settings": {"dtypes": ["float32"], "modes": ["forward"], "device": "cpu", "batch": 1, "n_heads": 8,
                            "head_dim": 64, "isolation": "forkserver", "min_repeats": 5, "repeats": 11, "warmup": 1,
                            "time_budget_s": 5.0, "memory_budget_gib": 8.0, "gemm_size": 1024},
               "records": RECORDS}
    table = report.render_markdown(results, None)
    assert "### flow_official / flow (float32)" in table and "| 4096 | 2.00 | 1.00 |" in table  # time, memory
    assert "### softmax / flow (float32)" in table and "| 4096 | 10.00 | 0.25 |" in table
    assert "goal" not in table.lower() and "met" not in table.split()


def test_isolation_records_a_failure_and_a_timeout():
    runs = isolation.Isolation("forkserver")
    config = {"variant": "flow", "mode": "forward", "dtype": "float32", "length": 64, "device": "cuda", "batch": 1,
              "n_heads": 1, "head_dim": 8, "threads": 1, "warmup_length": 32, "time_budget": 1.0, "min_repeats": 1,
              "repeats": 1, "min_time": 0.0, "warmup": 0, "gemm_size": 0}
    if not torch.cuda.is_available():
        failed = runs.run(config, timeout=60)
        assert "error" in failed and failed["variant"] == "flow"
    slow = runs.run({**config, "device": "cpu", "variant": "gemm", "gemm_size": 8192}, timeout=2)  # ~10 s a call
    assert slow["error"] == "timeout after 2 s"


def test_the_cpu_meter_gives_the_share_used_by_other_processes():
    meter = measure.CpuMeter()
    sum(i * i for i in range(200_000))  # this process's own work does not count
    share = meter.background()
    assert share is not None and 0.0 <= share <= 1.0


def test_tiny_real_run_writes_json_table_and_figure(tmp_path):
    figure = tmp_path / "figure.png"
    code = runner.main([
        "--lengths", "64,128", "--variants", "flow,flow_batched,flow_causal,flow_causal_materialised,matmul",
        "--repeats", "1", "--min-repeats", "1", "--min-time", "0", "--warmup", "0", "--warmup-length", "32",
        "--rounds", "1", "--gemm-size", "64", "--threads", "1", "--quiet-budget", "0", "--out", str(tmp_path),
        "--figure", str(figure), "--tag", "tiny",
    ])
    assert code == 0
    results = json.loads((tmp_path / "tiny.json").read_text())
    assert results["worker_env"] == isolation.WORKER_ENV
    assert results["machine"]["torch"] == torch.__version__
    measured = [r for r in results["records"] if "time_ms" in r]
    assert not [r for r in results["records"] if "error" in r]
    # 4 variants x 2 modes x 2 lengths + matmul (forward only) x 2 lengths + the GEMM before and after
    assert len(measured) == 4 * 2 * 2 + 2 + 2
    assert all(r["time_ms"] > 0 and r["peak_mib"] >= 0 and r["threads"] >= 1 for r in measured)
    assert all(0.0 <= r["background_cpu"] <= 1.0 for r in measured)
    table = (tmp_path / "tiny.md").read_text()
    assert "flow_causal_materialised / flow_causal" in table and "| 128 |" in table
    assert figure.stat().st_size > 10_000


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown variant 'flow_turbo'"):
        runner.parse_args(["--variants", "flow_turbo"])
