"""The load generator's HTTP parsing, and one short run against a local server."""
import http.server
import threading
import unittest

from ..loadgen import BadAnswer, Load, body_length, parse_head, request_bytes


class Parsing(unittest.TestCase):
    def test_the_head_gives_status_and_lower_case_headers(self):
        status, headers = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n"
                                     b"X-MLflow-Trace-Id: tr-abc\r\nconnection:keep-alive")
        self.assertEqual(status, 200)
        self.assertEqual(headers, {"content-length": "12", "x-mlflow-trace-id": "tr-abc",
                                   "connection": "keep-alive"})

    def test_a_malformed_head_is_a_bad_answer(self):
        for head in (b"garbage", b"HTTP/1.1 abc OK", b"HTTP/1.1 200 OK\r\nno colon here"):
            with self.assertRaises(BadAnswer):
                parse_head(head)

    def test_the_body_length_comes_from_content_length_or_chunked(self):
        self.assertEqual(body_length({"content-length": "359"}), 359)
        self.assertIsNone(body_length({"transfer-encoding": "chunked"}))
        for headers in ({}, {"content-length": "x"}):
            with self.assertRaises(BadAnswer):
                body_length(headers)

    def test_the_request_carries_its_length_and_headers(self):
        raw = request_bytes("127.0.0.1:1", "/p", b'{"a":1}', {"authorization": "Bearer k"})
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertEqual(body, b'{"a":1}')
        self.assertIn(b"POST /p HTTP/1.1", head)
        self.assertIn(b"content-length: 7", head)
        self.assertIn(b"authorization: Bearer k", head)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    counter = iter(range(10**9))
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 (the stdlib's name)
        self.rfile.read(int(self.headers["content-length"]))
        with self.lock:
            n = next(self.counter)
        body = b"{}"
        self.send_response(200 if n % 5 else 503)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-mlflow-trace-id", f"tr-{n}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class AgainstAServer(unittest.TestCase):
    def test_a_short_run_keeps_the_ids_of_2xx_answers_only(self):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            r = Load(server.server_address[1], "/p", b"{}", {}, conns=2, seconds=0.5).start().join()
        finally:
            server.shutdown()
            server.server_close()
        total = sum(r.statuses.values())
        self.assertGreater(total, 5)
        self.assertEqual(r.ok, r.statuses[200])
        self.assertEqual(len(r.ids), r.statuses[200])
        self.assertEqual(len(set(r.ids)), len(r.ids))
        self.assertTrue(all(int(i[3:]) % 5 for i in r.ids))  # no 503's id among them

    def test_a_refused_port_counts_errors_and_stops_at_the_deadline(self):
        import socket
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        r = Load(port, "/p", b"{}", {}, conns=1, seconds=0.3).start().join()
        self.assertEqual(r.ok, 0)
        self.assertGreater(sum(r.errors.values()), 0)


if __name__ == "__main__":
    unittest.main()
