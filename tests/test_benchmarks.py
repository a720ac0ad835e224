"""benchmarks/run.py end to end in its tiny suite (tiny shapes, one repeat): the JSON's structure, the
profile and HLO dumps. Never asserts on timings."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import harness, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    # One CPU device (not the tests' 8 fake ones) and a low XLA optimisation level: compiling the steps
    # is most of this test's time, and nothing here is timed for real.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--suite",
        "tiny",
        "--out",
        str(out / "results.json"),
        "--profile",
        str(out / "profile"),
        "--dump_hlo",
        str(out / "hlo"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return json.load(f), proc.stdout, out


def test_machine_and_settings(tiny):
    results, stdout, _ = tiny
    assert results["suite"] == "tiny"
    machine = results["machine"]
    for key in ("cpu_model", "cpu_count", "backend", "device_kind", "versions", "env"):
        assert key in machine
    assert results["backend"] == "cpu"
    assert results["versions"]["jax"] and results["versions"]["torch"]
    settings = results["settings"]
    assert settings["torch_threads"] == os.cpu_count()
    assert settings["repeats"] == 1
    assert set(results["load_average"]) >= {"start", "end"}
    assert "Train steps" in stdout and "Relation loss" in stdout


def test_train_step_rows(tiny):
    results, _, out = tiny
    rows = {row["kind"]: row for row in results["steps"]}
    assert set(rows) == {"pix2pix", "distill", "aging"}
    for kind, row in rows.items():
        jax_side = row["jax"]
        assert jax_side["median_s"] > 0 and jax_side["compile_s"] > 0 and len(jax_side["times_s"]) == 1
        assert jax_side["xla_flops"] > 0 and jax_side["memory"]["temp_size_in_bytes"] >= 0
        assert row["jax_examples_per_s"] > 0
        if kind == "aging":
            assert row["torch"] is None and row["model_flops"] is None
            assert any("no PyTorch reference" in note for note in row["notes"])
        else:
            assert row["torch"]["median_s"] > 0 and row["jax_over_torch"] > 0
            assert row["model_flops"] > 0 and row["jax_model_gflops_per_s"] > 0
        # --profile: an XLA trace per step; --dump_hlo: StableHLO and optimized HLO
        traces = [f for _, _, files in os.walk(row["profile"]) for f in files if f.endswith(".xplane.pb")]
        assert traces, row["profile"]
        for path in row["hlo"]:
            assert os.path.getsize(path) > 0
    assert rows["distill"]["settings"]["relation_method_jax"] == "fused"


def test_relation_flops_and_pipeline_sections(tiny):
    results, _, _ = tiny
    methods = {(r["n"], r["method"]): r for r in results["relation"]}
    assert set(methods) == {(64, "fused"), (64, "dense")}
    fused = methods[(64, "fused")]
    for key in ("median_s", "temp_bytes", "peak_bytes", "dense_over_fused_time", "dense_over_fused_peak"):
        assert key in fused
    assert results["flops"]["jax_gflops"] > 0 and results["flops"]["torch_gflops"] > 0
    pipeline = results["pipeline"]
    (row,) = pipeline["rows"]
    assert row["num_workers"] == 0 and row["batch_shape"] == [2, 32, 32, 3]
    assert row["examples_per_s"] > 0 and row["over_fastest_step"] > 0
    assert results["targets"] == {}  # the tracker's targets name the default suite's rows


def test_targets_read_the_default_rows():
    results = {
        "steps": [
            {
                "kind": "pix2pix",
                "settings": {"arch": "resnet_9blocks", "ngf": 64, "dtype": "float32"},
                "jax_over_torch": 0.9,
            }
        ],
        "relation": [
            {
                "n": 4096,
                "method": "fused",
                "median_s": 0.01,
                "dense_over_fused_time": 9.0,
                "dense_over_fused_temp": 60.0,
                "dense_over_fused_peak": 10.0,
            },
            {"n": 16384, "method": "fused", "median_s": 0.1},
        ],
    }
    t = run.targets(results)
    assert t["resnet_ngf64_jax_over_torch"]["met"]
    assert t["relation_4096_dense_over_fused_time"]["met"]
    assert t["relation_4096_dense_over_fused_temp_bytes"]["met"]
    assert not t["relation_4096_dense_over_fused_peak_bytes"]["met"]
    assert t["relation_16384_fused_runs"]["met"]


def test_interleaved_alternates_and_summarizes():
    calls = []
    times = harness.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert set(times["a"]) >= {"first_call_s", "median_s", "min_s", "times_s", "cpu_median_s"}
    assert len(times["b"]["times_s"]) == 3


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "steps,bogus"])
