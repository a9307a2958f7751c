"""Remote tier: block records in Redis, shared by every vLLM instance that uses the same format namespace.

Key: `<prefix>:<namespace hex>:<rank>:<block key hex>`, value: one record (header + payload, record.py).
The standard `redis` client is used with short timeouts. Any connection or timeout error opens a circuit for
`retry_s` seconds, during which every call returns "not there" at once (no request waits on a dead server);
afterwards one call probes again. Writes from workers go through a bounded background queue, so the engine's
step never waits on the network for a write.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

logger = logging.getLogger("vllm.tq_vllm.connector")


class RemoteStore:
    def __init__(self, url: str, prefix: str, namespace: str, *, timeout_s: float = 1.0, retry_s: float = 10.0,
                 ttl_s: int = 0, queue_size: int = 256):
        self.url = url
        self.prefix = f"{prefix}:{namespace}"
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.ttl_s = int(ttl_s)
        self._client = None
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.counters = {"redis_errors": 0, "redis_put_blocks": 0, "redis_put_bytes": 0, "redis_put_dropped": 0}
        self._queue: queue.Queue | None = None
        self._queue_size = queue_size
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ connection + circuit breaker
    def key(self, rank: str, key: bytes) -> str:
        return f"{self.prefix}:{rank}:{key.hex()}"

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _get_client(self):
        if self._client is None:
            import redis  # the standard client (optional dependency: pip install redis)

            self._client = redis.Redis.from_url(self.url, socket_timeout=self.timeout_s,
                                                socket_connect_timeout=self.timeout_s, retry_on_timeout=False)
        return self._client

    def _failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self.counters["redis_errors"] += 1
            first = self.available()
            self._down_until = time.monotonic() + self.retry_s
        if first:
            logger.warning("tq connector: Redis %s failed (%s: %s); not using Redis for %.0f s",
                           what, type(exc).__name__, exc, self.retry_s)

    def _call(self, what: str, fn, default):
        if not self.available():
            return default
        try:
            return fn(self._get_client())
        except Exception as e:  # redis.ConnectionError, TimeoutError, ResponseError, ImportError, ...
            self._failed(what, e)
            return default

    # ------------------------------------------------------------------ scheduler side
    def count_present(self, keys: list[bytes], ranks: list[str]) -> int:
        """Length of the leading run of `keys` present for every rank (0 when Redis is unreachable)."""
        if not keys:
            return 0

        def run(c):
            pipe = c.pipeline(transaction=False)
            for k in keys:
                for r in ranks:
                    pipe.exists(self.key(r, k))
            res = pipe.execute()
            n = 0
            for i in range(len(keys)):
                if all(res[i * len(ranks):(i + 1) * len(ranks)]):
                    n += 1
                else:
                    break
            return n

        return self._call("lookup", run, 0)

    # ------------------------------------------------------------------ worker side
    def get_many(self, rank: str, keys: list[bytes]) -> list[bytes | None]:
        """Values for `keys` (None where missing); all None when Redis is unreachable."""
        if not keys:
            return []

        def run(c):
            return c.mget([self.key(rank, k) for k in keys])

        return self._call("read", run, [None] * len(keys))

    def put_many_sync(self, rank: str, items: list[tuple[bytes, bytes]]) -> bool:
        def run(c):
            pipe = c.pipeline(transaction=False)
            for key, value in items:
                if self.ttl_s > 0:
                    pipe.set(self.key(rank, key), value, ex=self.ttl_s)
                else:
                    pipe.set(self.key(rank, key), value)
            pipe.execute()
            return True

        ok = self._call("write", run, False)
        if ok:
            with self._lock:
                self.counters["redis_put_blocks"] += len(items)
                self.counters["redis_put_bytes"] += sum(len(v) for _, v in items)
        return ok

    def put_many_async(self, rank: str, items: list[tuple[bytes, bytes]]) -> None:
        """Queues a write; dropped (and counted) when the queue is full or Redis is known to be down."""
        if not items:
            return
        if not self.available():
            with self._lock:
                self.counters["redis_put_dropped"] += len(items)
            return
        if self._queue is None:
            self._queue = queue.Queue(maxsize=self._queue_size)
            self._thread = threading.Thread(target=self._writer, name="tq-redis-writer", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait((rank, items))
        except queue.Full:
            with self._lock:
                self.counters["redis_put_dropped"] += len(items)

    def _writer(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                rank, items = job
                if not self.put_many_sync(rank, items):
                    with self._lock:
                        self.counters["redis_put_dropped"] += len(items)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 30.0) -> None:
        """Waits (bounded) until queued writes are done."""
        if self._queue is None:
            return
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        if self._queue is not None and self._thread is not None:
            self.flush(5.0)
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def take_counters(self) -> dict:
        with self._lock:
            out = dict(self.counters)
            for k in self.counters:
                self.counters[k] = 0
        return out
