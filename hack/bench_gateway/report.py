"""The printed report, computed from the results alone (pure: unit-tested without running
anything).

`rows`: one dict per measured run (load.Load's results: row, label, conc, requests, rps, p50..p99
in ms, non2xx, socket_errors, cpu_s, side_cpu_s, steal_pct) or per skipped row and connection
count (row, label, conc, skipped). `traces`: one dict per traced row (answered, wrk_completed,
exported, spans_exported, dropped, dropped_traces, failed, and for rows into MLflow stored,
rooted, spans_stored, experiment, receiver_cpu_s, nice).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class RunInfo:
    """What the header line says about the run."""
    threads: int
    duration: int
    warmup: int
    response_bytes: int
    ncpu: int
    nginx_workers: str


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def cpu_us_per_request(r: dict) -> str:
    return f"{r['cpu_s'] / r['requests'] * 1e6:.0f}" if r.get("requests") else "-"


def added(r: dict, direct: dict | None) -> str:
    """p50/p99 added over the direct row at the same connection count."""
    if direct and r["row"] != "direct" and "p99" in r and "p99" in direct:
        return f"{r['p50'] - direct['p50']:+.3f} / {r['p99'] - direct['p99']:+.3f} ms"
    return ""


def tracing_cost(off_rps: float, on_rps: float) -> float:
    """The throughput (%) a tracing row loses against tracing off."""
    return (off_rps - on_rps) / off_rps * 100


class _Results:
    def __init__(self, rows, traces):
        self.rows = rows
        self.traces = {t["row"]: t for t in traces}
        self.direct = {r["conc"]: r for r in rows if r["row"] == "direct" and "skipped" not in r}
        self.by = {(r["row"], r["conc"]): r for r in rows}
        self.concs = sorted({r["conc"] for r in rows})

    def rps(self, row, c):
        r = self.by.get((row, c))
        return r["rps"] if r and "skipped" not in r and r.get("rps") else None

    def share(self, row):
        """Share (%) of a tracing row's answered requests whose trace was exported."""
        t = self.traces.get(row, {})
        return t["exported"] / t["answered"] * 100 if t.get("answered") else None

    def cost(self, what, row, off, c):
        """"<what> = X% (target < 10%: ...)", or None without both rows."""
        on, exported = self.rps(row, c), self.share(row)
        if not (on and off):
            return None
        cost = tracing_cost(off, on)
        shared = f"; {exported:.1f}% of its traces were exported" if exported is not None else ""
        return f"{what} = {cost:.1f}% (target < 10%: {verdict(cost < 10)}{shared})"


def table(res: _Results, info: RunInfo) -> list[str]:
    out = [f"gateway benchmark: wrk, {info.threads} threads, {info.duration} s per run "
           f"(+{info.warmup} s warm-up), fixed {info.response_bytes}-byte response, "
           f"{info.ncpu} CPUs, nginx worker_processes {info.nginx_workers}"]
    head = (f"{'target':<30} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
            f"{'cpu us/req':>10} {'steal':>5}  added p50/p99 vs direct")
    out += [head, "-" * len(head)]
    for c in res.concs:
        for r in res.rows:
            if r["conc"] != c:
                continue
            if "skipped" in r:
                out.append(f"{r['label']:<30} {c:>4}  skipped: {r['skipped']}")
                continue
            errs = r.get("non2xx", 0) + r.get("socket_errors", 0)
            p50 = f"{r['p50']:.3f}" if "p50" in r else "-"
            p99 = f"{r['p99']:.3f}" if "p99" in r else "-"
            steal = f"{r['steal_pct']:.0f}%" if "steal_pct" in r else "-"
            out.append(f"{r['label']:<30} {c:>4} {r['rps']:>9.0f} {p50:>8} {p99:>8} {errs:>7} "
                       f"{cpu_us_per_request(r):>10} {steal:>5}  {added(r, res.direct.get(c))}")
        out.append("")
    return out


def side_cpu(res: _Results, info: RunInfo) -> list[str]:
    side = [r for r in res.rows if r.get("side_cpu_s") and r.get("requests")]
    if not side:
        return []
    out = ["trace receiver's CPU during the measured runs (on the same cores as everything above):"]
    for r in side:
        who = "MLflow" if r["row"].startswith("on") else "the sink (nginx)"
        pct = r["side_cpu_s"] / (info.duration * info.ncpu) * 100
        out.append(f"  {r['label']}, conc {r['conc']}: {who} used {r['side_cpu_s']:.1f} CPU s in "
                   f"{info.duration} s ({pct:.0f}% of {info.ncpu} cores), the gateway "
                   f"{r['cpu_s']:.1f} CPU s")
    return out + [""]


def ratios(res: _Results) -> list[str]:
    lines = []
    for c in res.concs:
        off, ml, ng, sk = (res.rps(row, c) for row in ("off", "mlflow", "nginx", "sink"))
        parts = []
        for row, what in (("on", "tracing on"), ("on-nice", "tracing on, MLflow niced")):
            on = res.rps(row, c)
            if on and ml:
                parts.append(f"this gateway ({what}) / MLflow gateway = {on / ml:.1f}x "
                             f"(target >= 10x: {verdict(on / ml >= 10)})")
            parts.append(res.cost(f"cost of {what}", row, off, c))
            if on and ng:
                parts.append(f"{what} vs nginx proxy = {on / ng * 100:.0f}% "
                             f"(target >= 50%: {verdict(on / ng >= 0.5)})")
        parts.append(res.cost("tracing cost, sink instead of MLflow", "sink", off, c))
        parts = [p for p in parts if p]
        if sk and ng:
            parts.append(f"vs nginx proxy, sink = {sk / ng * 100:.0f}%")
        if off and ng:
            parts.append(f"vs nginx proxy, tracing off = {off / ng * 100:.0f}%")
        d = res.direct.get(c)
        for row in ("off", "on", "on-nice", "sink"):
            r = res.by.get((row, c))
            if c == 32 and r and d and "p99" in r and "p99" in d:
                a = r["p99"] - d["p99"]
                parts.append(f"added p99 (tracing {row}) = {a:.3f} ms "
                             f"(target < 1 ms: {verdict(a < 1)})")
        if parts:
            lines.append(f"  conc {c}: " + "; ".join(parts))
    return ["ratios:", *lines] if lines else []


def trace_counts(res: _Results) -> list[str]:
    out = ["traces:"] if res.traces else []
    for row, what in (("on", "this gateway, tracing on"),
                      ("on-nice", "this gateway, tracing on, MLflow niced")):
        t = res.traces.get(row)
        if not t:
            continue
        out.append(
            f"  {what}: {t['answered']} requests answered (its requests counter; wrk completed "
            f"{t['wrk_completed']} incl. warm-ups); exported {t['exported']} traces "
            f"({_pct(res.share(row))} of them; root span and trace info stored), "
            f"{t['spans_exported']} spans; dropped {t.get('dropped_traces', 0)} traces whole at "
            f"their start and {t['dropped']} spans in all (export queue full); failed "
            f"{t['failed']} spans (MLflow did not accept)")
        out.append(
            f"    MLflow (experiment {t['experiment']}, nice {t.get('nice', 0)}) holds "
            f"{t['stored']} traces ({t['rooted']} with their root span), {t['spans_stored']} "
            f"spans; that server (--workers 2) used {t['receiver_cpu_s']:.1f} CPU s meanwhile, "
            f"on the same cores")
    t = res.traces.get("sink")
    if t:
        out.append(
            f"  this gateway, tracing on, sink: {t['answered']} requests answered; exported "
            f"{t['exported']} traces ({_pct(res.share('sink'))}), {t['spans_exported']} spans; "
            f"dropped {t['dropped_traces']} traces whole, {t['dropped']} spans in all; failed "
            f"{t['failed']} spans; the sink (nginx) used {t['receiver_cpu_s']:.1f} CPU s meanwhile")
    t = res.traces.get("mlflow")
    if t:
        out.append(
            f"  MLflow gateway: {t['answered']} requests answered (200s in its access log; wrk "
            f"completed {t['wrk_completed']} incl. warm-ups); MLflow (experiment "
            f"{t['experiment']}, created by the endpoint) holds {t['stored']} traces "
            f"({t['rooted']} with their root span), {t['spans_stored']} spans; requests in flight "
            f"when wrk stops are still served and traced (up to conc per wrk run)")
    return out


def _pct(share: float | None) -> str:
    # a row whose gateway answered nothing has no share (the old report failed there)
    return f"{share:.1f}%" if share is not None else "-"


def cpu_table(res: _Results) -> list[str]:
    """The honest CPU table: each server's own CPU per request from /proc (so a tracking server
    on the same cores does not pollute the gateway's figure), the trace receiver's apart (per
    exported trace for the sink, per stored trace for MLflow, over the whole row and its drain),
    and the steal of each run."""
    order = ("nginx", "off", "sink", "on", "on-nice")
    if not any(res.by.get((row, c)) for row in order[1:] for c in res.concs):
        return []
    head = (f"{'row':<44} {'conc':>4} {'CPU us/req':>10} {'vs off':>7} {'exported':>8} "
            f"{'receiver CPU':>22} {'steal':>5}")
    out = ["CPU per request (each server's own, from /proc):", head, "-" * len(head)]
    for c in res.concs:
        off = res.by.get(("off", c))
        off_us = off["cpu_s"] / off["requests"] * 1e6 if off and off.get("requests") else None
        for row in order:
            r = res.by.get((row, c))
            if not r or "skipped" in r or not r.get("requests"):
                continue
            us = r["cpu_s"] / r["requests"] * 1e6
            vs = f"{(us - off_us) / off_us * 100:+.0f}%" if off_us and row not in (
                "off", "nginx") else ""
            share = res.share(row)
            exported = f"{share:.1f}%" if share is not None and row != "off" else ""
            out.append(f"{r['label']:<44} {c:>4} {us:>10.0f} {vs:>7} {exported:>8} "
                       f"{_receiver(res, row, r):>22} {r.get('steal_pct', 0):>4.0f}%")
    return out + [""]


def _receiver(res: _Results, row: str, r: dict) -> str:
    t = res.traces.get(row, {})
    if row == "sink" and t.get("exported"):
        return f"sink {t['receiver_cpu_s'] / t['exported'] * 1e6:.0f} us/trace"
    if row in ("on", "on-nice") and t.get("stored"):
        return f"MLflow {t['receiver_cpu_s'] / t['stored'] * 1e3:.0f} ms/stored"
    return ""


def coarse_notes(res: _Results) -> list[str]:
    return [f"note: {r['label']} at conc {r['conc']} completed {r['requests']} requests, under 2 "
            f"per connection: its req/s and percentiles are coarse (a longer BENCH_DURATION "
            f"steadies them)"
            for r in res.rows if "skipped" not in r and r.get("requests", 0) < 2 * r["conc"]]


LEGEND = ("errors = non-2xx answers + socket errors (connect/read/write/timeout); cpu us/req = CPU "
          "time of the server under test (the proxy alone, not the fake) during the measured run / "
          "requests; steal = CPU time the hypervisor took from this machine during the run (rows "
          "with much of it are not comparable)")


def render(rows: list[dict], traces: list[dict], info: RunInfo) -> str:
    """The whole report, as printed."""
    res = _Results(rows, traces)
    lines = [*table(res, info), *cpu_table(res), *side_cpu(res, info), *ratios(res),
             *trace_counts(res),
             *coarse_notes(res), LEGEND]
    return "\n".join(lines) + "\n"
