"""Run under torchrun by tests/test_harness.py: rank 1 raises mid-forward of a TP model; every rank must end at once."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.test_harness import case_rank_fails_inside_a_model  # noqa: E402

from dtp.testing import run_under_torchrun  # noqa: E402

if __name__ == "__main__":
    start = time.perf_counter()
    run_under_torchrun(case_rank_fails_inside_a_model, sys.argv[1], timeout_s=1800)  # the timeout is not what ends it
    print(f"rank finished after {time.perf_counter() - start:.1f} s")
