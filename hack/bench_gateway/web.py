"""Small HTTP helpers over urllib (the benchmark needs no client library): JSON posts to MLflow's
REST API, the check request every row sends before its load, and sums of Prometheus samples."""
import json
import re
import sys
import urllib.error
import urllib.request

from .processes import BenchError


def chat_body(model: str) -> bytes:
    """The request every row sends (wrk's Lua script builds the same body): a small chat."""
    return json.dumps({
        "model": model,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Say hello."}],
        "max_tokens": 16, "temperature": 0,
    }, separators=(",", ":")).encode()


# Part of the fake's answer: a row whose check request gets it back is served by the fake.
ANSWER_TEXT = "How can I help you today?"


def request(url: str, data: bytes | None = None, headers=None, timeout: float = 60):
    """(status, body text) of one request; HTTP error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def post_json(url: str, payload: dict) -> dict:
    """POSTs `payload`, returns the JSON answer; raises BenchError (with the body) on failure."""
    try:
        status, body = request(url, json.dumps(payload).encode(),
                               {"content-type": "application/json"})
    except (urllib.error.URLError, OSError) as e:
        raise BenchError(f"POST {url}: {e}") from None
    if status // 100 != 2:
        raise BenchError(f"POST {url} -> {status}: {body}")
    return json.loads(body)


def check_target(url: str, model: str) -> bool:
    """Sends one chat request and checks that the fake's answer came back (reason on stderr)."""
    try:
        status, body = request(url, chat_body(model), {
            "content-type": "application/json", "authorization": "Bearer sk-client"})
    except (urllib.error.URLError, OSError) as e:
        print(f"POST {url} -> {e}", file=sys.stderr)
        return False
    if status != 200 or ANSWER_TEXT not in body:
        print(f"POST {url} -> {status}: {body}", file=sys.stderr)
        return False
    return True


def metric_sum(exposition: str, name: str) -> int:
    """The sum of the samples of metric `name` over all its label sets, in Prometheus text format
    (truncated to a whole number, as the counters and gauges summed here are)."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{|$)")
    total = 0.0
    for line in exposition.splitlines():
        fields = line.split()
        if fields and pattern.match(fields[0]):
            total += float(fields[-1])
    return int(total)


def answers(url: str) -> bool:
    """Whether GET `url` answers 2xx."""
    try:
        return request(url, timeout=10)[0] // 100 == 2
    except (urllib.error.URLError, OSError):
        return False
