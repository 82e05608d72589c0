"""The benchmarks under bench/: each reports its numbers and refuses a bad flag before any work."""

import re
import subprocess
import sys

import pytest

from conftest import REPO, run_script_here


def test_bench_train_rejects_an_unknown_configuration_before_any_work():
    result = run_script_here("bench/bench_train.py", "--model", "tiny", "--configs", "bf16-full", "fp16-full")
    assert result.returncode != 0 and "--configs takes fp32-full bf16-full fp32-lora bf16-lora, got fp16-full" \
        in result.stderr


def test_bench_train_reports_speed_and_held_out_loss_per_configuration():
    result = subprocess.run([sys.executable, "bench/bench_train.py", "--model", "tiny", "--seconds", "1", "--configs",
                             "fp32-full", "bf16-full"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines()}
    for config in ("fp32-full", "bf16-full"):
        assert re.match(rf"{config}: \d+ tokens/s \(median of \d+ steps\), held-out loss [\d.]+ -> [\d.]+$", lines[config])
    assert re.match(r"full: bf16 / fp32 throughput [\d.]+x$", lines["full"])


def test_bench_contention_reports_each_backend_alone_and_under_load():
    result = subprocess.run([sys.executable, "bench/bench_contention.py", "--model", "tiny", "--seconds", "1",
                             "--backends", "hf", "--tokens", "64", "--omp-wait-policy", "PASSIVE", "--threads", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OMP_WAIT_POLICY=PASSIVE, threads 1" in result.stdout
    assert re.search(r"^hf     alone: \d+ tokens/s \(median of \d+ steps\), 1 torch threads", result.stdout, re.M)
    assert re.search(r"^hf with load: \d+ tokens/s", result.stdout, re.M)
    assert re.search(r"^hf: [\d.]+x slower with the competing process$", result.stdout, re.M)


@pytest.mark.parametrize("flags", [["--backends", "jax"], ["--omp-wait-policy", "lazy"], ["--seconds", "0"]])
def test_bench_contention_rejects_bad_flags_before_any_work(flags):
    result = run_script_here("bench/bench_contention.py", *flags)
    assert result.returncode != 0 and "error: --backends takes hf and vllm" in result.stderr


@pytest.mark.parametrize("flags, message", [(["--repeats", "0"], "must be positive"),
                                            (["--dtypes", "float16"], "invalid choice: 'float16'")])
def test_bench_rollout_rejects_bad_flags_before_any_work(flags, message):
    result = run_script_here("bench/bench_rollout.py", *flags)
    assert result.returncode == 2 and message in result.stderr and "| model |" not in result.stdout
