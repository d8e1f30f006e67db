"""A reduced run of benchmarks/load_test.py against a real server on loopback (the full run: 1000 requests from 32
clients, figures in benchmarks/RESULTS-robustness.md): concurrent clients, mixed prompt and answer lengths,
streaming, cancelled mid-way; no 5xx, every completed answer equal to the same request served alone, RSS flat."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import load_test  # noqa: E402


@pytest.mark.slow
def test_load_no_5xx_answers_intact_memory_flat(tmp_path):
    r = load_test.load_test(load_test.tiny_model_folder(), requests=200, clients=16, max_tokens=8,
                            server_args=["--dtype", "float32", "--quant", "none"], log_path=tmp_path / "server.log")
    assert r["server_errors_5xx"] == 0 and r["statuses"] == {"200": 200}
    assert r["transport_errors"] == 0, r["transport_error_examples"]
    assert r["kinds"]["cancelled"] > 10 and r["kinds"]["stream"] > 30 and r["kinds"]["whole"] > 30
    assert r["checked_answers"] >= 150 and r["mismatches"] == 0, r["mismatch_examples"]
    assert r["broken_streams"] == 0
    assert r["idle_after"] and r["server_exit_code"] == 0  # cancelled requests freed their slots
    assert r["rss_growth_mb"] < max(30.0, 0.05 * r["rss_warm_mb"]), r
