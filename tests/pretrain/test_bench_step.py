"""The step benchmark runs and reports consistent figures (not a timed test)."""

import math

from medjax.bench.step import benchmark, matmul_peak_flops
from tests.helpers import smoke_config


def test_step_benchmark_reports_positive_consistent_figures(tmp_path):
    config = smoke_config()
    result = benchmark(config, steps=2, workdir=str(tmp_path))
    assert result["sec_per_step"] > 0
    assert math.isclose(result["images_per_sec"], config.train.batch_size_per_device / result["sec_per_step"])
    assert result["step_gflop"] > 0  # XLA's cost analysis counted the step
    assert math.isclose(result["fraction_of_peak"],
                        result["achieved_gflops"] / result["matmul_peak_gflops"], rel_tol=1e-6)
    assert math.isfinite(result["loss"])


def test_matmul_peak_is_measured():
    assert matmul_peak_flops(n=256, repeats=2) > 1e8  # any CPU does more than 0.1 GFLOP/s
