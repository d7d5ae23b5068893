"""The gateway benchmark (not a test): `python3 -m hack.bench_gateway` from the repository root.

On this machine, against one local fake upstream (nginx returning a fixed 359-byte OpenAI
chat.completion with usage), one load generator (wrk, fixed connection count, fixed duration)
measures, side by side in one run:
  direct               wrk -> fake upstream
  nginx reverse proxy  wrk -> nginx (proxy_pass, keepalive upstream) -> fake   (the reference)
  this gateway, off    wrk -> `mlflow-gateway-operator gateway` (usageTracking: false) -> fake
  this gateway, on     same with usageTracking: true, traces exported to a real MLflow server
                       (on the same cores: its CPU seconds are reported with the traces)
  on, MLflow niced     the same with that MLflow server (and its workers) at nice 19: it takes
                       only CPU the rest leaves idle, as a tracking server on other machines
                       would. The gateway's cost is what a production deployment would see
                       (it builds whole traces only for those the server can store)
  this gateway, sink   same, but exporting to a sink (nginx answering 200 to the OTLP and
                       trace-info requests at once) instead of MLflow: every trace is
                       exported, so this row is the gateway's own whole cost of tracing,
                       without the CPU a tracking server on the same cores takes
  MLflow gateway       wrk -> MLflow's own AI gateway (in `mlflow server`, an endpoint whose
                       secret's api_base is the fake) -> fake, usage_tracking on
each at every connection count (default 32 and 128), and reports requests/s, p50/p99 latency,
errors, the server's CPU per request, the hypervisor's steal and the latency added over direct,
then the ratios the targets are about and how many traces were exported, dropped, failed and
actually stored.

Targets: added p99 < 1 ms at 32 connections; >= 10x MLflow gateway's throughput; tracing costs
< 10% throughput; >= 50% of the nginx reverse proxy's throughput, tracing on.

Both gateways are driven on the same route, POST /gateway/mlflow/v1/chat/completions with
"model": "<endpoint name>"; direct and nginx get POST /v1/chat/completions with the model.
Everything listens on 127.0.0.1 on free ports. Every process started here is stopped by pid on
exit (Ctrl-C and errors included); every load run is bounded in time. Numbers are only
meaningful on a quiet machine: wrk, the proxies and the fake share the cores (`nproc` is printed).

The environment knobs are documented in `settings.py`. Modules, one concern each:
  settings   the BENCH_* environment, read once
  tools      what the benchmark needs installed (nginx, wrk with apt) and the gateway build
  processes  the run directory, free ports, every started process and its cleanup
  cpu        CPU accounting from /proc: a process tree's CPU seconds, the hypervisor's steal
  web        small HTTP helpers (urllib): JSON posts, the check request, Prometheus sums
  nginx      the fake upstream, the reference proxy and the trace sink (nginx configs)
  load       wrk: the request script, warm-up and measured runs, wrk's output parsed
  mlflow     MLflow servers (hack/mlflow.sh), traces counted in their databases, MLflow's gateway
  gateway    this gateway's rows: off, on (MLflow, niced or not), sink
  report     the printed report, from the results alone (pure)
  main       the rows in order
  tests/     unit tests of the pure parts and of the process bookkeeping:
             `python3 -m unittest discover -s hack/bench_gateway -t .` from the repository root
"""
