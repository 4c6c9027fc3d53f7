"""bench/soak.py, for a few seconds on the fake model, as users run it: every kind of request
in the mix is sent and answered as designed, /readyz stays 200."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_soak_passes():
    proc = subprocess.run([sys.executable, "bench/soak.py", "--fake", "--minutes", "0.15",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["passed"] and summary["unexpected"] == {}
    kinds = summary["by_kind_and_status"]
    assert kinds["malformed"] == {"400": kinds["malformed"]["400"]}
    assert set(kinds["oversized"]) == {"413"}
    assert summary["readyz"] and set(summary["readyz"]) == {"200"}
    assert summary["latency_ms"]["chat"]["p99"] >= summary["latency_ms"]["chat"]["p50"] > 0
