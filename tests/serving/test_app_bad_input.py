"""Every bad input the HTTP boundary refuses, in one table: the status, a short body that does not
echo the input, nothing logged, and a server that still serves a feed and a good POST afterwards."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient

from feedrank.serving.app import create_app
from feedrank.serving.config import AuthConfig, RateLimitConfig, RequestLimits

KEY_ENV, KEY = "FEEDRANK_TEST_API_KEY", "k3y-for-tests"
JSON = {"content-type": "application/json"}
SHORT = 300  # bytes: an error body is a message, never the request


@dataclass
class World:
    """What a case needs to build its request: a known item and the service clock's now."""

    item: str
    now: dt.datetime

    def event(self, **fields) -> dict:
        return {"user_id": "u1", "item_id": self.item, **fields}

    def ts(self, **delta) -> str:
        return (self.now + dt.timedelta(**delta)).isoformat()


Send = Callable[[TestClient, World], object]


@dataclass
class Case:
    name: str
    send: Send
    status: int
    says: str  # a phrase of the message
    config: dict = field(default_factory=dict)  # ServingConfig overrides


def post_raw(body: bytes | str, headers: dict | None = None) -> Send:
    return lambda c, w: c.post("/events", content=body, headers=JSON if headers is None else headers)


def post(make: Callable[[World], object]) -> Send:
    return lambda c, w: c.post("/events", content=json.dumps(make(w)), headers=JSON)


def feed(**params) -> Send:
    return lambda c, w: c.get("/feed", params={"user_id": "u1", **params})


BIG = "x" * 100_000
AUTH = {"auth": AuthConfig(api_key_env=KEY_ENV)}
LIMITED = {"rate_limit": RateLimitConfig(enabled=True, rate_per_s=0.001, burst=2)}


def third_feed(c: TestClient, w: World) -> object:
    for _ in range(2):  # the burst
        assert c.get("/feed", params={"user_id": "u1"}).status_code == 200
    return c.get("/feed", params={"user_id": "u1"})


CASES = [
    # bodies that are not (acceptable) JSON
    Case("list nested 1000 deep", post_raw("[" * 1000 + "]" * 1000), 422, "nests 1000 levels deep"),
    Case("object nested 1000 deep", post_raw('{"a":' * 1000 + "1" + "}" * 1000), 422, "nests 1000 levels deep"),
    Case("not JSON", post_raw(b"{not json"), 422, "not valid JSON"),
    Case("empty body", post_raw(b""), 422, "not valid JSON"),
    Case("not UTF-8", post_raw(b'{"user_id": "\xff\xfe"}'), 422, "not UTF-8"),
    Case("NaN literal", post_raw('{"user_id": "u1", "item_id": "i", "dwell_s": NaN}'), 422, "NaN is not a JSON value"),
    Case("integer of 5000 digits", post_raw('{"user_id": "u1", "item_id": "i", "position": ' + "9" * 5000 + "}"),
         422, "not valid JSON"),
    Case("a JSON string", post(lambda w: "hello"), 422, "event object or a list"),
    Case("an empty list", post(lambda w: []), 422, "no events"),
    Case("a number in a list", post(lambda w: [w.event(), 7]), 422, "events[1]"),
    Case("unknown field", post(lambda w: w.event(colour="red")), 422, "colour"),
    Case("unknown field with a 100 KB name", post(lambda w: {**w.event(), BIG: 1}), 422, "Extra inputs"),
    # content type and size
    Case("text/plain", post_raw(b"{}", {"content-type": "text/plain"}), 415, "application/json"),
    Case("no content type", post_raw(b"{}", {}), 415, "no Content-Type"),
    Case("form encoded", post_raw(b"a=1", {"content-type": "application/x-www-form-urlencoded"}), 415, "application/json"),
    Case("body over max_body_bytes", post_raw(b" " * 2000), 413, "over the limit", {"max_body_bytes": 1000}),
    Case("too many events", post(lambda w: [w.event()] * 4), 413, "at most 3", {"max_events_per_post": 3}),
    # strict types
    Case('clicked "yes"', post(lambda w: w.event(clicked="yes")), 422, "clicked"),
    Case('clicked "true"', post(lambda w: w.event(clicked="true")), 422, "valid boolean"),
    Case("clicked 1", post(lambda w: w.event(clicked=1)), 422, "valid boolean"),
    Case('hidden "false"', post(lambda w: [w.event(hidden="false")]), 422, "events[0].hidden"),
    Case('position "3"', post(lambda w: w.event(position="3")), 422, "valid integer"),
    Case("position 2**40", post(lambda w: w.event(position=2**40)), 422, "position"),
    Case('dwell_s "12"', post(lambda w: w.event(dwell_s="12")), 422, "valid number"),
    # bounds
    Case("dwell_s 1e38", post(lambda w: w.event(dwell_s=1e38)), 422, "at most 86400 s"),
    Case("dwell_s 1e400 (inf)", post_raw('{"user_id": "u1", "item_id": "i", "dwell_s": 1e400}'), 422, "finite"),
    Case("dwell_s over a lowered maximum", post(lambda w: w.event(dwell_s=61.0)), 422, "at most 60 s",
         {"limits": RequestLimits(max_dwell_s=60.0)}),
    Case("dwell_s -2", post(lambda w: w.event(dwell_s=-2)), 422, "greater than or equal to 0"),
    Case("ts 9999-12-31", post(lambda w: w.event(ts="9999-12-31T23:59:59Z")), 422, "after server time"),
    Case("ts 9999-12-31 at -05:00", post(lambda w: w.event(ts="9999-12-31T23:59:59-05:00")), 422, "after server time"),
    Case("ts an hour ahead", post(lambda w: w.event(ts=w.ts(hours=1))), 422, "3600 s after server time"),
    Case("ts 30 days back", post(lambda w: w.event(ts=w.ts(days=-30))), 422, "30 days before server time"),
    Case("ts 0001-01-01", post(lambda w: w.event(ts="0001-01-01T00:00:00+01:00")), 422, "before server time"),
    Case("ts a number", post(lambda w: w.event(ts=1714521600)), 422, "ISO-8601 string"),
    Case("ts not a date", post(lambda w: w.event(ts="yesterday")), 422, "ts"),
    # ids
    Case("user_id empty", post(lambda w: w.event(user_id="")), 422, "empty or blank"),
    Case("user_id blank", post(lambda w: w.event(user_id="   ")), 422, "empty or blank"),
    Case("user_id with NUL", post(lambda w: w.event(user_id="u\x001")), 422, "control characters"),
    Case("user_id with CR LF", post(lambda w: w.event(user_id="u1\r\nX-Forged: 1")), 422, "control characters"),
    Case("user_id with U+2028", post(lambda w: w.event(user_id="u\u20281")), 422, "control characters"),
    Case("user_id with a leading space", post(lambda w: w.event(user_id=" u1")), 422, "whitespace"),
    Case("user_id a number", post(lambda w: w.event(user_id=17)), 422, "valid string"),
    Case("user_id of 100 KB", post(lambda w: w.event(user_id=BIG)), 422, "at most 256 characters"),
    Case("item_id of 100 KB", post(lambda w: w.event(item_id=BIG)), 422, "at most 256 characters"),
    Case("item_id with LF", post(lambda w: w.event(item_id=w.item + "\n")), 422, "control characters"),
    Case("item_id unknown", post(lambda w: w.event(item_id="no-such-item")), 422, "unknown item"),
    Case("request_id with TAB", post(lambda w: w.event(request_id="r\t1")), 422, "control characters"),
    Case("1000 bad events", post(lambda w: [w.event(clicked="yes")] * 1000), 422, "999 more errors"),
    # GET /feed
    Case("feed: user_id with NUL", feed(user_id="u\x001"), 422, "control characters"),
    Case("feed: user_id of 10 KB", feed(user_id=BIG[:10_000]), 422, "at most 256 characters"),  # httpx caps URLs at 64 KB
    Case("feed: user_id blank", feed(user_id=" "), 422, "empty or blank"),
    Case("feed: k abc", feed(k="abc"), 422, "valid integer"),
    # access
    Case("feed without the API key", feed(), 401, "API key", AUTH),
    Case("events with a wrong API key", lambda c, w: c.post("/events", json=w.event(), headers={"X-API-Key": "guess"}),
         401, "API key", AUTH),
    Case("over the rate limit", third_feed, 429, "rate limit", LIMITED),
]


@pytest.fixture
def serve(make_service, monkeypatch):
    """``serve(config) -> (service, app)``: a memory-cache service with the case's overrides."""
    monkeypatch.setenv(KEY_ENV, KEY)

    def make(config: dict):
        service = make_service(**config)
        return service, create_app(service)

    return make


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_briefly_and_the_server_still_serves(case, serve):
    service, app = serve(case.config)
    # no ``with``: the app's lifespan would close the service between the two clients (make_service closes it)
    client = TestClient(app, raise_server_exceptions=False)
    world = World(str(service.catalogue.item_ids[service.catalogue.rankable[0]]), service.clock())
    response = case.send(client, world)
    assert response.status_code == case.status, response.text[:500]
    assert len(response.content) < SHORT, response.text[:500]
    assert case.says in response.text, response.text
    assert "x" * 100 not in response.text  # no input echoed back
    assert not list((service.sink.root / "events").glob("date=*"))  # nothing logged, no partition made

    # the server still serves (another client, in case this one is rate limited)
    other = TestClient(app, raise_server_exceptions=False, client=("10.0.0.2", 4000), headers={"X-API-Key": KEY})
    assert other.get("/feed", params={"user_id": "u1", "k": 3}).status_code == 200
    posted = other.post("/events", json=world.event(clicked=True, dwell_s=3.5, ts=world.ts(seconds=-1)))
    assert posted.status_code == 200 and posted.json() == {"accepted": 1}


def test_the_strict_rules_still_accept_every_good_edge(serve):
    service, app = serve({})
    client = TestClient(app, raise_server_exceptions=False)
    w = World(str(service.catalogue.item_ids[service.catalogue.rankable[0]]), service.clock())
    naive = (w.now - dt.timedelta(hours=1)).replace(tzinfo=None).isoformat()  # naive: taken as UTC
    batch = [w.event(dwell_s=86_400.0, clicked=True, shared=False, hidden=False), w.event(dwell_s=7, clicked=True, ts=w.ts(seconds=-5)),
             w.event(ts=w.ts(seconds=240)), w.event(ts=w.ts(days=-6)), w.event(ts=naive),
             w.event(user_id="ユーザー 1", request_id="r-1", position=2**31 - 1), w.event(user_id="u" * 256)]  # fmt: skip
    response = client.post("/events", content=json.dumps(batch), headers={"content-type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200 and response.json() == {"accepted": len(batch)}, response.text


def test_refusals_are_counted_in_metrics(serve):
    _, app = serve({"auth": AuthConfig(api_key_env=KEY_ENV)})
    client = TestClient(app, raise_server_exceptions=False, headers={"X-API-Key": KEY})
    client.post("/events", content="[" * 100 + "]" * 100, headers=JSON)  # 422, unreadable: one event
    client.post("/events", content="{}", headers={"content-type": "text/plain"})  # 415: one event
    client.post("/events", json=[{"user_id": "u1", "item_id": "i", "clicked": "yes"}] * 5)  # 422: five events
    client.post("/events", json={"user_id": "u1", "item_id": "no-such-item"})  # 422 from the pipeline: one event
    client.post("/events", json={"user_id": "u1", "item_id": "i"}, headers={"X-API-Key": "guess"})  # 401: not an event
    client.get("/feed", params={"user_id": "u\x00"})
    client.get("/no-such-route")  # a 404: not counted (its path would be a label)
    text = client.get("/metrics").text
    assert 'feedrank_events_total{outcome="rejected"} 8.0' in text
    assert 'feedrank_http_refused_total{route="/events",status="422"} 3.0' in text
    assert 'feedrank_http_refused_total{route="/events",status="415"} 1.0' in text
    assert 'feedrank_http_refused_total{route="/events",status="401"} 1.0' in text
    assert 'feedrank_http_refused_total{route="/feed",status="422"} 1.0' in text
    assert 'feedrank_http_refused_total{route="/feed",status="429"} 0.0' in text
    assert "no-such-route" not in text


def test_a_client_that_goes_away_mid_body_ends_as_a_400_not_a_crash(serve):
    """Driven at the ASGI level: the body's second message is a disconnect (``TestClient`` cannot send one)."""
    _, app = serve({})
    received = iter([{"type": "http.request", "body": b'[{"user_id": ', "more_body": True}, {"type": "http.disconnect"}])
    sent: list[dict] = []

    async def receive() -> dict:
        return next(received)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/events", "raw_path": b"/events", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    text = TestClient(app).get("/metrics").text
    assert 'feedrank_http_refused_total{route="/events",status="400"} 1.0' in text
    assert 'feedrank_events_total{outcome="rejected"} 1.0' in text


def test_inspector_routes_need_the_api_key_like_feed(serve):
    """The inspector's JSON routes read histories and feeds: the same key guards them as /feed."""
    _, app = serve(AUTH)
    client = TestClient(app, raise_server_exceptions=False)
    for path in ("/inspect/meta", "/inspect/users", "/inspect/user/u1", "/inspect/feed?user_id=u1"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"X-API-Key": KEY}).status_code != 401, path
