"""A closed-loop HTTP/1.1 load generator over asyncio, for the delivery scenarios (delivery.py).

wrk measures throughput; these scenarios need what it does not give: the `x-mlflow-trace-id` of
every answered request (so that "stored == served" is checked trace by trace against MLflow, not
as two counts), and connections that come back by themselves when the gateway restarts under
them. The rates involved are low (a fake upstream answering in 200 ms: about 5 requests/s per
connection), so a Python client is cheap enough: about a few percent of a core at 200 requests/s.

Each connection sends one request, reads the whole answer, and sends the next, until the
deadline or `stop()`; an error (refused, reset, timeout, a malformed answer) closes it, counts
the error and reconnects after a short pause. Everything is bounded by the deadline plus the
request timeout. The parsing (`parse_head`, `body_length`) is apart and unit-tested.
"""
import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

TRACE_HEADER = "x-mlflow-trace-id"
RECONNECT_PAUSE = 0.1  # s between a failed connection and the next attempt
MAX_HEAD = 64 << 10


class BadAnswer(Exception):
    """An answer that is not HTTP/1.1 as this client reads it."""


def request_bytes(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One keep-alive POST with a JSON body."""
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", "content-type: application/json",
             f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """(status, headers with lower-case names) of an answer's head, without its final blank line;
    repeated headers keep the last value."""
    text = head.decode("latin-1")
    first, _, rest = text.partition("\r\n")
    parts = first.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BadAnswer(f"status line {first!r}")
    headers = {}
    for line in rest.split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadAnswer(f"header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def body_length(headers: dict[str, str]) -> int | None:
    """The body's length from content-length; None for a chunked body; BadAnswer for neither
    (this client only speaks keep-alive, where one of the two is required)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return None
    if "content-length" in headers:
        try:
            return int(headers["content-length"])
        except ValueError:
            raise BadAnswer(f"content-length {headers['content-length']!r}") from None
    raise BadAnswer("neither content-length nor chunked")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise BadAnswer(f"chunk size {size_line!r}") from None
        if size == 0:
            # trailers, up to the blank line
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


@dataclass
class LoadResult:
    """What the clients saw. `ids`: the trace ids of the 2xx answers, in order of answer."""
    ids: list[str] = field(default_factory=list)
    ok_without_id: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    started: float = 0.0
    ended: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.ids) + self.ok_without_id

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)


class Load:
    """`conns` connections to 127.0.0.1:`port` sending `body` to `path` for `seconds`, in a thread
    of their own (the caller runs the scenario's timeline meanwhile)."""

    def __init__(self, port: int, path: str, body: bytes, headers: dict[str, str], conns: int,
                 seconds: float, timeout: float = 30.0):
        self.port, self.conns, self.seconds, self.timeout = port, conns, seconds, timeout
        self.request = request_bytes(f"127.0.0.1:{port}", path, body, headers)
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> "Load":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> LoadResult:
        """Waits for the end (bounded: the deadline plus the request timeout and a margin)."""
        self._thread.join(self.seconds + self.timeout + 30)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(self.timeout + 30)
        return self.result

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        r = self.result
        r.started = time.monotonic()
        deadline = r.started + self.seconds
        await asyncio.gather(*(self._connection(deadline) for _ in range(self.conns)))
        r.ended = time.monotonic()

    def _done(self, deadline: float) -> bool:
        return self._stop.is_set() or time.monotonic() >= deadline

    async def _connection(self, deadline: float) -> None:
        r = self.result
        while not self._done(deadline):
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), self.timeout)
                while not self._done(deadline):
                    writer.write(self.request)
                    status, headers = await asyncio.wait_for(self._answer(reader), self.timeout)
                    r.statuses[status] += 1
                    if 200 <= status < 300:
                        if TRACE_HEADER in headers:
                            r.ids.append(headers[TRACE_HEADER])
                        else:
                            r.ok_without_id += 1
                    if headers.get("connection", "").lower() == "close":
                        break
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError, BadAnswer) as e:
                r.errors[type(e).__name__] += 1
                await asyncio.sleep(RECONNECT_PAUSE)
            finally:
                if writer is not None:
                    writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            raise BadAnswer("head too long")
        status, headers = parse_head(head[:-4])
        length = body_length(headers)
        if length is None:
            await _read_chunked(reader)
        else:
            await reader.readexactly(length)
        return status, headers
