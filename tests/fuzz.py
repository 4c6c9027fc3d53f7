"""Hypothesis settings for the fuzz tests: a small, repeatable run in `make test`, a long
random one in `make fuzz`.

`make fuzz` sets NUMBALM_FUZZ=1: each fuzz test then runs `fuzz_examples` cases (at least
10,000 over a target's tests together) with fresh random seeds; otherwise `small` cases, the
same ones every run (derandomized), so the default suite stays quick and stable.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZING = os.environ.get("NUMBALM_FUZZ") == "1"
OVERRIDE = int(os.environ.get("NUMBALM_HYPOTHESIS_EXAMPLES", "0"))  # a quick check of a long run


def fuzz_settings(small: int, fuzz_examples: int) -> settings:
    """Settings for one fuzz test: `small` derandomized cases, or `fuzz_examples` random ones
    under `make fuzz`."""
    return settings(
        max_examples=OVERRIDE or (fuzz_examples if FUZZING else small),
        derandomize=not FUZZING,
        deadline=None,  # a case that reads a real vocabulary takes ~0.3 s on a busy machine
        database=None,  # failures are reproduced from the printed example, not a local cache
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
        print_blob=True,
    )
