"""The API key check and the per-client token bucket, without HTTP; the app's wiring of both is in
test_app_bad_input.py."""

import pytest
from fastapi.testclient import TestClient

from feedrank.serving.access import ApiKeyCheck, RateLimiter
from feedrank.serving.app import create_app
from feedrank.serving.config import AuthConfig, RateLimitConfig, ServingConfig


def test_api_key_check_accepts_only_the_key():
    keys = ApiKeyCheck("s3cret")
    assert keys.allows("s3cret")
    assert not any(keys.allows(k) for k in (None, "", "s3cre", "s3cret ", "S3CRET", "s3cret\x00"))


def test_api_key_is_off_by_default_and_an_unset_variable_is_an_error():
    assert ApiKeyCheck.from_config(AuthConfig()) is None
    assert ApiKeyCheck.from_config(AuthConfig(api_key_env="K"), {"K": "abc"}).allows("abc")
    for environ in ({}, {"K": ""}):
        with pytest.raises(ValueError, match="'K', which is unset or empty"):
            ApiKeyCheck.from_config(AuthConfig(api_key_env="K"), environ)


def test_create_app_refuses_an_api_key_variable_that_is_unset(make_service, monkeypatch):
    monkeypatch.delenv("FEEDRANK_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="FEEDRANK_UNSET_KEY"):
        create_app(make_service(auth=AuthConfig(api_key_env="FEEDRANK_UNSET_KEY")))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_the_burst_then_the_rate_per_client():
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(enabled=True, rate_per_s=2.0, burst=3), clock=clock)
    assert [limiter.wait_s("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_s("a") == pytest.approx(0.5)  # one token at 2/s
    assert limiter.wait_s("b") == 0.0  # another client has its own bucket
    clock.now += 0.5
    assert limiter.wait_s("a") == 0.0 and limiter.wait_s("a") == pytest.approx(0.5)
    clock.now += 60  # refills up to the burst, not beyond
    assert [limiter.wait_s("a") for _ in range(4)][-1] == pytest.approx(0.5)


def test_token_bucket_keeps_at_most_max_clients():
    limiter = RateLimiter(RateLimitConfig(enabled=True, rate_per_s=1.0, burst=1, max_clients=3), clock=Clock())
    for client in ("a", "b", "c", "d"):
        limiter.wait_s(client)
    assert len(limiter) == 3
    assert limiter.wait_s("a") == 0.0  # "a" was the least recently seen: dropped, back with a full bucket
    assert limiter.wait_s("d") == pytest.approx(1.0)


def test_rate_limit_is_off_by_default():
    assert RateLimiter.from_config(RateLimitConfig()) is None


def test_access_settings_are_validated():
    for bad in ({"rate_limit": RateLimitConfig(rate_per_s=0)}, {"rate_limit": RateLimitConfig(burst=0)},
                {"auth": AuthConfig(api_key_env="")}, {"auth": AuthConfig(header="")}):  # fmt: skip
        with pytest.raises(ValueError):
            ServingConfig(**bad).validate()


def test_healthz_and_metrics_stay_open_with_an_api_key(make_service, monkeypatch):
    monkeypatch.setenv("FEEDRANK_TEST_KEY", "abc")
    client = TestClient(create_app(make_service(auth=AuthConfig(api_key_env="FEEDRANK_TEST_KEY"))))
    assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
    assert client.get("/feed", params={"user_id": "u1"}).status_code == 401
    assert client.get("/feed", params={"user_id": "u1"}, headers={"X-API-Key": "abc"}).status_code == 200


def test_wrong_keys_spend_the_rate_limit_too(make_service, monkeypatch):
    monkeypatch.setenv("FEEDRANK_TEST_KEY", "abc")
    service = make_service(auth=AuthConfig(api_key_env="FEEDRANK_TEST_KEY"),
                           rate_limit=RateLimitConfig(enabled=True, rate_per_s=0.001, burst=2))  # fmt: skip
    client = TestClient(create_app(service))
    statuses = [client.get("/feed", params={"user_id": "u1"}, headers={"X-API-Key": f"guess{i}"}).status_code for i in range(3)]
    assert statuses == [401, 401, 429]
