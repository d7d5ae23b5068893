"""The gateway's trace-export metrics, polled during a delivery scenario: the queue's peak
(traces, bytes, age of the oldest) and the counters (delivered, dropped by reason, export
requests), summed across gateway restarts.

Two generations of names are read, so that today's export (before issue #15) is measured by the
same code: the durable queue's `trace_queue_*`, `traces_delivered_total`,
`traces_dropped_total{reason}` and `trace_export_requests_total{kind,result}`, and the older
`trace_export_queue_spans` (a queue of spans, not traces), `traces_exported_total` (trace infos
sent) and `traces_dropped_total` (no reason). The parsing and the arithmetic are pure
(unit-tested); `Watch` is the thread that polls.
"""
import re
import threading
import time
import urllib.error

from .web import request

PREFIX = "mlflow_gateway_"
GAUGES = ("trace_queue_traces", "trace_queue_bytes", "trace_queue_oldest_age_seconds",
          "trace_export_queue_spans")
COUNTERS = ("requests_total", "traces_delivered_total", "traces_exported_total",
            "traces_dropped_total", "spans_dropped_total", "trace_export_requests_total")

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text format -> {(name, sorted (label, value) pairs): value}; comments and
    unparsable lines are skipped."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = value
    return out


def pick(parsed: dict, name: str, **labels: str) -> float | None:
    """The sum of the samples of `name` whose labels include `labels`; None if there is none."""
    found = [v for (n, ls), v in parsed.items()
             if n == name and all((k, v2) in ls for k, v2 in labels.items())]
    return sum(found) if found else None


def sample(parsed: dict) -> dict[str, float]:
    """The figures a scenario reports, from one scrape (missing metrics are left out): the
    gauges, the counters, and the counters split by label that matter."""
    s = {}
    for name in GAUGES + COUNTERS:
        v = pick(parsed, PREFIX + name)
        if v is not None:
            s[name] = v
    for reason in ("queue_full", "rejected"):
        v = pick(parsed, PREFIX + "traces_dropped_total", reason=reason)
        if v is not None:
            s[f"dropped_{reason}"] = v
    for kind in ("otlp", "trace_info"):
        for result in ("ok", "error"):
            v = pick(parsed, PREFIX + "trace_export_requests_total", kind=kind, result=result)
            if v is not None:
                s[f"export_{kind}_{result}"] = v
    return s


class Totals:
    """Counters summed across process restarts (a counter that goes down was reset by a new
    process: what the old one had counted is kept) and gauges' peaks. What a process counted
    after its last scrape is not seen: the scenarios scrape often and say so."""

    def __init__(self):
        self.base: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.scrapes = 0

    def add(self, s: dict[str, float]) -> None:
        self.scrapes += 1
        for k, v in s.items():
            if k in GAUGES:
                self.peak[k] = max(self.peak.get(k, 0.0), v)
                self.last[k] = v
                continue
            prev = self.last.get(k)
            if prev is not None and v < prev:
                self.base[k] = self.base.get(k, 0.0) + prev
            self.last[k] = v

    def restarted(self) -> None:
        """A new process is about to be scraped: what the old one counted becomes the base
        (without this, a new process that counts past the old one's last value before its first
        scrape would look like the same process)."""
        for k, v in self.last.items():
            if k not in GAUGES:
                self.base[k] = self.base.get(k, 0.0) + v
        self.last = {k: v for k, v in self.last.items() if k in GAUGES}

    def total(self, key: str) -> float | None:
        if key not in self.last and key not in self.base:
            return None
        return self.base.get(key, 0.0) + self.last.get(key, 0.0)

    def gauge(self, key: str) -> float | None:
        return self.last.get(key)


class Watch:
    """Scrapes http://127.0.0.1:PORT/metrics every `interval` s in a thread until `stop()`;
    a scrape that fails (the gateway restarting) is skipped."""

    def __init__(self, port: int, interval: float = 0.5):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.totals = Totals()
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def start(self) -> "Watch":
        self._thread.start()
        return self

    def scrape(self) -> dict[str, float] | None:
        """One scrape now (also from the caller's thread); None if the gateway did not answer."""
        try:
            status, body = request(self.url, timeout=5)
        except (urllib.error.URLError, OSError):
            status, body = 0, ""
        if status != 200:
            with self._lock:
                self.failed += 1
            return None
        s = sample(parse_exposition(body))
        with self._lock:
            self.totals.add(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scrape()
            self._stop.wait(self.interval)

    def restarted(self) -> None:
        with self._lock:
            self.totals.restarted()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def snapshot(self) -> tuple[dict, dict]:
        """(totals of the counters, peaks of the gauges) so far."""
        with self._lock:
            t = self.totals
            keys = (set(t.last) | set(t.base)) - set(GAUGES)
            return ({k: t.total(k) for k in keys}, dict(t.peak))


def wait_until(check, seconds: float, every: float = 1.0) -> bool:
    """Calls `check()` every `every` s until it is true (True) or `seconds` passed (False)."""
    deadline = time.monotonic() + seconds
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)
