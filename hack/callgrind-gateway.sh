#!/usr/bin/env bash
# Instructions per request of the gateway process (callgrind counts all its threads), a figure
# that does not depend on what else the machine does:
#   hack/callgrind-gateway.sh BIN off|sink [EXPORT_MODE]
# BIN: a gateway build (e.g. target/release/mlflow-gateway-operator). off: tracing off; sink:
# every trace exported to a local HTTP sink answering 200 at once. 304 warm-up requests, the
# counters zeroed, 3,000 requests over 8 keep-alive connections (Python), 3 s for the export.
# Needs valgrind and tools/dev's fake-llm (FAKE=..., default target/release/fake-llm).
set -euo pipefail
BIN=$1; MODE=$2; EXPORT_MODE=${3:-spans-only}
command -v valgrind >/dev/null || { echo "valgrind is required (apt-get install valgrind)" >&2; exit 1; }
D=$(mktemp -d "${TMPDIR:-/tmp}/mgo-callgrind.XXXXXX")
FAKE=${FAKE:-$(cd "$(dirname "$0")/.." && pwd)/target/release/fake-llm}
$FAKE --api-key sk-bench > $D/fake.url & FAKE_PID=$!
SINK_PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
GW_PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
python3 - $SINK_PORT > $D/sink.log 2>&1 <<'PY' & SINK_PID=$!
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", 0)); self.rfile.read(n)
        self.send_response(200); self.send_header("content-type","application/json"); self.send_header("content-length","2"); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
for i in $(seq 50); do [ -s $D/fake.url ] && break; sleep 0.2; done
FAKE_URL=$(head -1 $D/fake.url)
TRACK=$([ "$MODE" = off ] && echo false || echo true)
cat > $D/ep.yaml <<Y
apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata: {name: bench, namespace: default, uid: bench-uid}
spec:
  models:
    - {name: fake, provider: openai, model: gpt-4o-mini, apiBase: "$FAKE_URL/v1", apiKeySecretRef: {name: k, key: k}}
  usageTracking: $TRACK
  access: {open: true}
Y
env -i PATH=$PATH HOME=$HOME GATEWAY_API_KEY_FAKE=sk-bench MLFLOW_TRACKING_URI=http://127.0.0.1:$SINK_PORT MLFLOW_EXPERIMENT_ID=1 GATEWAY_TRACE_EXPORT_MODE=$EXPORT_MODE \
  valgrind --tool=callgrind --callgrind-out-file=$D/cg.out $BIN gateway --endpoint $D/ep.yaml --listen 127.0.0.1:$GW_PORT > $D/gw.log 2>&1 & GW_PID=$!
for i in $(seq 600); do curl -sf http://127.0.0.1:$GW_PORT/readyz >/dev/null 2>&1 && break; sleep 0.5; done
load() {
python3 - $GW_PORT $1 <<'PY'
import sys, http.client, threading, json
port, total = int(sys.argv[1]), int(sys.argv[2])
body = json.dumps({"model":"bench","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0},separators=(",",":")).encode()
def run(n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(n):
        c.request("POST", "/gateway/mlflow/v1/chat/completions", body, {"content-type":"application/json"})
        r = c.getresponse(); r.read(); assert r.status == 200, r.status
ts = [threading.Thread(target=run, args=(total//8,)) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
}
load 304
sleep 3
callgrind_control -z $GW_PID > /dev/null
load 3000
sleep 3
callgrind_control -d $GW_PID > /dev/null
sleep 1
kill $GW_PID $FAKE_PID $SINK_PID 2>/dev/null || true
wait $GW_PID 2>/dev/null || true
F=$(ls -t $D/cg.out* | grep -v "cg.out$" | head -1)
IR=$(grep -h "^summary:\|^totals:" $F | head -1 | awk '{print $2}')
echo "$MODE $EXPORT_MODE: $IR instructions for 3000 requests = $((IR/3000)) per request ($F)"
