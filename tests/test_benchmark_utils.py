"""The measurement helpers of the benchmark scripts (`scripts/benchmark_utils.py`): tables, CPU meter, idle wait."""

import importlib.util
import time
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_utils.py"
spec = importlib.util.spec_from_file_location("benchmark_utils", SCRIPT)
benchmark_utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark_utils)


def test_markdown_table_aligns_the_first_column_left_and_the_others_right():
    table = benchmark_utils.markdown_table(["name", "seconds", "runs"], [["a", "1.50", 3], ["b", "0.25", 10]])
    assert table.splitlines() == [
        "| name | seconds | runs |",
        "|---|---:|---:|",
        "| a | 1.50 | 3 |",
        "| b | 0.25 | 10 |",
    ]


def test_markdown_table_follows_an_explicit_alignment():
    table = benchmark_utils.markdown_table(["stack", "batch", "cache"], [["CDAN", 8, "on"]], align="lrl")
    assert table.splitlines()[1] == "|---|---:|---|"


@pytest.mark.parametrize(
    "header, rows, align",
    [
        (["a", "b"], [[1, 2]], "lrr"),  # one letter too many
        (["a", "b"], [[1, 2]], "lc"),  # not a known alignment
        (["a", "b"], [[1, 2, 3]], None),  # a row longer than the header
    ],
)
def test_markdown_table_rejects_mismatched_shapes(header, rows, align):
    with pytest.raises(ValueError):
        benchmark_utils.markdown_table(header, rows, align)


def test_cpu_meter_sees_a_busy_loop_and_a_sleep():
    with benchmark_utils.CpuMeter() as busy:
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            pass
    with benchmark_utils.CpuMeter() as idle:
        time.sleep(0.3)
    assert busy.seconds >= 0.3 and idle.seconds >= 0.3
    assert 0.0 < busy.own_cpu_utilization <= 1.1  # one thread; less when another process shares its core
    assert idle.own_cpu_utilization < 0.5
    for meter in (busy, idle):
        assert 0.0 <= meter.foreign_load <= 1.0


def test_wait_for_idle_machine_gives_up_after_its_bound():
    waited = benchmark_utils.wait_for_idle_machine(max_foreign_load=0.0, max_wait_seconds=0.0, window_seconds=0.05)
    assert 0.0 <= waited < 1.0


def test_peak_rss_is_positive_and_does_not_drop():
    first = benchmark_utils.peak_rss_mb()
    buffer = bytearray(32 * 1024 * 1024)
    assert 0.0 < first <= benchmark_utils.peak_rss_mb()
    del buffer
