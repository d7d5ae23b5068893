#!/usr/bin/env python3
"""A local stand-in for the OpenAI API, for the demo: answers POST /v1/chat/completions (no
streaming) in OpenAI's wire format, with usage, when the Bearer key matches.

    hack/fake-openai.py PORT API_KEY

Listens on 127.0.0.1 only. Standard library only."""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, KEY = int(sys.argv[1]), sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        request = json.loads(self.rfile.read(length) or b"{}")
        if self.headers.get("authorization") != f"Bearer {KEY}":
            self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}})
            return
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        question = next((m.get("content", "") for m in reversed(request.get("messages", [])) if m.get("role") == "user"), "")
        answer = f"(fake {request.get('model')}) You asked: {question}"
        prompt_tokens, completion_tokens = max(1, len(str(question).split())), len(answer.split())
        self._send(200, {
            "id": f"chatcmpl-demo-{int(time.time() * 1000)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
