"""bench/load_test.py, small: the excess gets 429 + Retry-After, the rest completes, no 5xx."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

LOAD_TEST = Path(__file__).resolve().parents[2] / "bench" / "load_test.py"


def test_overload_is_refused_cleanly(capsys):
    spec = importlib.util.spec_from_file_location("load_test", LOAD_TEST)
    load_test = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = load_test  # dataclasses look their module up
    spec.loader.exec_module(load_test)
    summary = load_test.main(["--requests", "24", "--concurrency", "12", "--slots", "1",
                              "--queue", "3", "--max-tokens", "8", "--time-limit", "20"])
    assert summary["passed"], summary
    assert summary["rejected_429"] > 0 and summary["completed"] >= 8  # 2 waves x (1 + 3)
    assert summary["status_5xx_other"] == 0 and summary["readyz_after"] == 200
    assert "ttft_p99_ms" in capsys.readouterr().out
