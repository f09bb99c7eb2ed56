"""Accepted events, passed between serving workers over Redis pub/sub: the fast path.

Why: each uvicorn worker keeps its own ``UserStore`` (histories, "seen" sets, counts). The
receiving worker applies and logs an event, then publishes the accepted rows; every other worker
applies them to its own store and drops the user's cached vector within milliseconds, so a vector
computed from the old state in the meantime does not outlive the message.

Only the receiving worker writes the serving log, so the log on disk has each event once.
Delivery is Redis pub/sub's: at most once, to the workers subscribed at the time. That is enough
because the bus is not what guarantees convergence: the shared serving log is
(``feedrank.serving.follow``). A worker that missed a message (Redis down, paused, or the worker
still starting) reads the event from the log within ``store.catch_up_interval_s``, and one that
gets it both ways applies it once (the store dedupes by event id, which the rows carry).
Publishing never fails a POST: a Redis fault is logged and counted, and the event stays accepted.

Message: the sender's 16-byte worker token, then the events as one Arrow IPC stream.

Example::

    bus = EventBus("redis://127.0.0.1:6379/0")
    bus.start(lambda events: store_and_cache_update(events))   # a daemon thread per worker
    bus.publish(events_table)                                   # after a POST's events are accepted
    bus.close()
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import pyarrow as pa
import redis

log = logging.getLogger(__name__)

CHANNEL = "feedrank:events"
_TOKEN_BYTES = 16


def encode_events(token: bytes, events: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, events.schema) as writer:
        writer.write_table(events)
    return token + sink.getvalue().to_pybytes()


def decode_events(message: bytes) -> tuple[bytes, pa.Table]:
    """(sender token, events); raises ``ValueError`` on a message that is not one of ours."""
    if len(message) <= _TOKEN_BYTES:
        raise ValueError(f"event message of {len(message)} bytes is too short")
    try:
        table = pa.ipc.open_stream(pa.py_buffer(message[_TOKEN_BYTES:])).read_all()
    except pa.ArrowInvalid as exc:
        raise ValueError(f"event message is not an Arrow IPC stream: {exc}") from exc
    return message[:_TOKEN_BYTES], table


class EventBus:
    """Publishes this worker's accepted events and delivers the other workers' to ``on_events``."""

    def __init__(self, url: str, channel: str = CHANNEL, publish_timeout_s: float = 1.0, retry_s: float = 1.0):
        """``publish_timeout_s`` bounds what a hung Redis adds to a POST; the listener has its own connection."""
        self.channel, self.retry_s = channel, retry_s
        self.token = uuid.uuid4().bytes
        self._publisher = redis.Redis.from_url(url, socket_timeout=publish_timeout_s, socket_connect_timeout=publish_timeout_s)
        self._listener = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._count_lock = threading.Lock()  # publish runs on the request threads, side by side
        self.published = self.publish_errors = self.received = self.dropped = 0

    def publish(self, events: pa.Table) -> bool:
        """Send ``events`` to the other workers; False (logged, counted) when Redis failed."""
        try:
            self._publisher.publish(self.channel, encode_events(self.token, events))
        except redis.RedisError as exc:
            with self._count_lock:
                self.publish_errors += 1
            log.warning("event bus: publishing %d events failed (%s); other workers read them from the serving log", events.num_rows, exc)
            return False
        with self._count_lock:
            self.published += 1
        return True

    def start(self, on_events: Callable[[pa.Table], None]) -> None:
        """Deliver other workers' events to ``on_events`` from a daemon thread, resubscribing after faults."""
        if self._thread is not None:
            raise RuntimeError("the event bus is already started")
        self._thread = threading.Thread(target=self._listen, args=(on_events,), name="feedrank-event-bus", daemon=True)
        self._thread.start()

    @property
    def subscribed(self) -> bool:
        """Whether the listener is subscribed now: False while starting or while Redis is
        unreachable, when other workers' events are not delivered here."""
        return self._subscribed.is_set()

    def _listen(self, on_events: Callable[[pa.Table], None]) -> None:
        while not self._stop.is_set():
            pubsub = self._listener.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                self._subscribed.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None:
                        self._deliver(message["data"], on_events)
            except redis.RedisError as exc:
                self._subscribed.clear()
                log.warning("event bus: subscription lost (%s); retrying in %.1f s", exc, self.retry_s)
                self._stop.wait(self.retry_s)
            finally:
                pubsub.close()

    def _deliver(self, data: bytes, on_events: Callable[[pa.Table], None]) -> None:
        try:
            token, events = decode_events(data)
        except ValueError as exc:
            self.dropped += 1
            log.warning("event bus: dropped a message on %s: %s", self.channel, exc)
            return
        if token == self.token:
            return  # our own events: applied before they were published
        try:
            on_events(events)
        except Exception:  # a bad message must not end the listener: log it, keep listening
            self.dropped += 1
            log.exception("event bus: applying %d events from another worker failed", events.num_rows)
            return
        self.received += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._publisher.close()
        self._listener.close()
