"""tools/benchlib.py: the statistics the benchmark pages are made of (no timing asserted)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import benchlib  # noqa: E402


def test_paired_ratio_ignores_a_slow_phase_that_hits_both():
    """Two runtimes at a true ratio of 0.8; the second half of the run is 2x slower for both. The ratio
    of overall medians depends on which runs the slow phase caught; the paired ratio does not."""
    a = [0.8] * 10 + [1.6] * 10
    b = [1.0] * 8 + [2.0] * 12          # b's bursts straddle the phase change differently
    assert abs(benchlib.paired_ratio(a, b, group=5) - 0.8) < 1e-9
    assert abs(benchlib.paired_ratio([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) - 0.5) < 1e-9


def test_paired_ratio_sees_a_real_difference():
    assert benchlib.paired_ratio([1.2] * 10, [1.0] * 10, group=5) > 1.1
