"""32 concurrent streaming clients for 60 s against the real service under gunicorn, with an admin reload (a new
model loaded and swapped in) in the middle: zero failed requests. Uses the bench load script's own client."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def test_32_clients_for_60s_with_a_reload(services):
    from bench.chat import LocalService, questions, run_level

    service = LocalService("tiny", max_new_tokens=32)
    with service as url:  # the reload loads the model again from disk and swaps it in while clients stream
        result = run_level(url, clients=32, seconds=60, qs=questions(), reload_at=30, admin_token=service.admin)
    print(f"load: {result}")
    assert result["reload_http"] == 202
    assert result["errors"] == 0, result["error_samples"]
    assert result["replies"] >= 32
    assert result["ttft_p95_ms"] >= result["ttft_p50_ms"] > 0
