"""Rate limits per API key and per client address (server/http/ratelimit.py): token buckets
of requests and tokens per minute, 429 with Retry-After and OpenAI's x-ratelimit-* headers,
counted in /metrics; and /metrics behind the API key when asked."""

from __future__ import annotations

import openai
import pytest

from server.http.ratelimit import Limit, RateLimiter, duration
from tests.helpers import chat_body


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def limited_app(make_app, clock, **config):
    """An app with rate limits on a clock the test moves."""
    app = make_app(**config)
    c = app.extensions["numbalm"].config
    app.extensions["numbalm"].rate_limits = RateLimiter(
        c.rate_limit_rpm, c.rate_limit_tpm, c.rate_limit_ip_rpm, c.rate_limit_ip_tpm,
        clock=clock)
    return app


def chat(client, key=None, address="10.0.0.1", **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=4, **body),
                    headers=headers, environ_base={"REMOTE_ADDR": address})
    r.get_data()
    r.close()  # as a server does after the last byte: the tokens are charged now
    return r


def test_requests_per_minute_then_429_with_retry_after(make_app, clock):
    client = limited_app(make_app, clock, rate_limit_rpm=3).test_client()
    remaining = []
    for _ in range(3):
        r = chat(client)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    r = chat(client)
    assert r.status_code == 429
    error = r.get_json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "requests per minute (3 per client address)" in error["message"]
    assert r.headers["Retry-After"] == "20"  # one request refills in 60 / 3 s
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 20
    assert chat(client).status_code == 200


def test_each_api_key_has_its_own_bucket(make_app, clock):
    client = limited_app(make_app, clock, rate_limit_rpm=1,
                         api_keys=["sk-a", "sk-b"]).test_client()
    assert chat(client, "sk-a").status_code == 200
    r = chat(client, "sk-a", address="10.9.9.9")  # another address, the same key
    assert r.status_code == 429 and "per API key" in r.get_json()["error"]["message"]
    assert chat(client, "sk-b").status_code == 200  # the same address, another key
    assert chat(client, "sk-wrong").status_code == 401  # auth first: no bucket for it


def test_each_address_has_its_own_bucket(make_app, clock):
    client = limited_app(make_app, clock, rate_limit_ip_rpm=1,
                         api_keys=["sk-a"]).test_client()
    assert chat(client, "sk-a", address="10.0.0.1").status_code == 200
    assert chat(client, "sk-a", address="10.0.0.2").status_code == 200
    r = chat(client, "sk-a", address="10.0.0.1")
    assert r.status_code == 429 and "per client address" in r.get_json()["error"]["message"]


def test_tokens_per_minute_are_charged_after_the_response(make_app, clock):
    client = limited_app(make_app, clock, rate_limit_tpm=20).test_client()
    r = chat(client)
    usage = r.get_json()["usage"]
    assert r.status_code == 200 and usage["total_tokens"] > 0
    assert chat(client).headers["x-ratelimit-remaining-tokens"] == str(
        max(0, 20 - usage["total_tokens"]))  # headers are written before this one is charged
    for _ in range(5):
        r = chat(client)
        if r.status_code == 429:
            break
    assert r.status_code == 429
    assert "tokens per minute (20 per client address)" in r.get_json()["error"]["message"]
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    clock.now += 600
    assert chat(client).status_code == 200


def test_refusals_are_counted_and_open_routes_are_not_limited(make_app, clock):
    client = limited_app(make_app, clock, rate_limit_rpm=1).test_client()
    assert chat(client).status_code == 200
    assert chat(client).status_code == 429
    for path in ("/healthz", "/metrics", "/healthz"):
        r = client.get(path, environ_base={"REMOTE_ADDR": "10.0.0.1"})
        assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers
    text = client.get("/metrics").get_data(as_text=True)
    assert 'numbalm_rate_limited_total{kind="requests",scope="key"} 1.0' in text


def test_no_limits_no_headers(client):
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers


def test_the_openai_client_sees_a_rate_limit_error(make_app, serve):
    url = serve(make_app(rate_limit_rpm=1))
    oai = openai.OpenAI(base_url=url + "/v1", api_key="sk-x", max_retries=0, timeout=20)
    oai.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "a"}],
                                max_tokens=2)
    with pytest.raises(openai.RateLimitError) as exc:
        oai.chat.completions.create(model="fake-model", max_tokens=2,
                                    messages=[{"role": "user", "content": "a"}])
    assert exc.value.response.headers["retry-after"] == "60"
    assert exc.value.body["code"] == "rate_limit_exceeded"


def test_metrics_behind_the_api_key(make_app):
    open_client = make_app(api_keys=["sk-a"]).test_client()
    assert open_client.get("/metrics").status_code == 200  # the default: open
    client = make_app(api_keys=["sk-a"], metrics_auth=True).test_client()
    r = client.get("/metrics")
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "missing_api_key"
    assert client.get("/metrics", headers={"Authorization": "Bearer sk-a"}).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code in (
        200, 503)


def test_bucket_refills_continuously_and_caps(clock):
    limit = Limit(60, clock)  # one a second
    assert all(limit.take("c", 1) == 0 for _ in range(60))
    assert limit.take("c", 1) == pytest.approx(1.0)
    clock.now += 0.5
    assert limit.take("c", 1) == pytest.approx(0.5)
    clock.now += 3600
    assert limit.state("c") == (60, 60, 0.0)  # full, not more
    limit.charge("c", 100)
    assert limit.wait("c") == pytest.approx(40.0, abs=1e-6)


def test_clients_kept_are_bounded(clock, monkeypatch):
    import server.http.ratelimit as ratelimit

    monkeypatch.setattr(ratelimit, "MAX_CLIENTS", 10)
    limit = Limit(5, clock)
    for i in range(100):
        limit.take(f"client-{i}", 1)
    assert len(limit.buckets) == 10 and "client-99" in limit.buckets


@pytest.mark.parametrize("seconds, text", [(0.02, "20ms"), (1, "1s"), (59.2, "1m0s"),
                                           (360, "6m0s"), (0, "0ms")])
def test_reset_durations_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text
