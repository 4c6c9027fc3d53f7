"""bench/load_test.py, small, run as users run it: the excess gets 429 + Retry-After, the rest
completes, no 5xx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_overload_is_refused_cleanly():
    proc = subprocess.run([sys.executable, "bench/load_test.py", "--requests", "24",
                           "--concurrency", "12", "--slots", "1", "--queue", "3",
                           "--max-tokens", "8", "--time-limit", "20", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["passed"], summary
    assert summary["rejected_429"] > 0 and summary["completed"] >= 8  # 2 waves x (1 + 3)
    assert summary["status_5xx_other"] == 0 and summary["readyz_after"] == 200
    assert summary["ttft_p99_ms"] > 0
