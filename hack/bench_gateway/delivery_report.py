"""The delivery benchmark's printed report, from its results alone (pure: unit-tested).

A result is one dict per run (delivery.py's `_common` plus the scenario's fields): row, scenario,
mode ("today" for the build before issue #15, "default" when the gateway chose), served,
load_seconds, stored, stored_served, missing, extra, with_preview, drain_seconds, drained,
left_in_queue, totals (counters summed across restarts), peaks (gauges), and for sustained runs
gateway_cpu_s, mlflow_cpu_s, steal_pct; for outage runs down_seconds, queued_at_resume; for
restart runs signal, exit_seconds, exit_status, queued_before, queue_dir_bytes_at_restart,
recovered.
"""
from .report import verdict
from .settings import mlflow_version

MIB = 1 << 20


def dropped(r: dict) -> int:
    """Traces the gateway dropped (its counter, all reasons)."""
    return int(r["totals"].get("traces_dropped_total") or 0)


def queue_peak(r: dict) -> str:
    """"traces / MiB / oldest s" of the durable queue, or "N spans" for today's span queue."""
    p = r["peaks"]
    if "trace_queue_traces" in p:
        return (f"{p['trace_queue_traces']:.0f} / {p.get('trace_queue_bytes', 0) / MIB:.1f} / "
                f"{p.get('trace_queue_oldest_age_seconds', 0):.0f}")
    if "trace_export_queue_spans" in p:
        return f"{p['trace_export_queue_spans']:.0f} spans"
    return "-"


def stored_per_second(r: dict) -> float:
    """Traces stored per second of load plus drain (MLflow's pace, as seen end to end)."""
    return r["stored"] / max(r["load_seconds"] + r["drain_seconds"], 1e-9)


def per(numerator: float | None, denominator: int, scale: float) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator * scale:.0f}"


def label(r: dict) -> str:
    return {"today": "today (8846bd5)", "default": "default mode"}.get(r["mode"], r["mode"])


def lost_line(r: dict) -> str:
    """served, stored and the id comparison, with the verdict on nothing lost."""
    extra = f", extra {r['extra']}" if r["extra"] else ""
    return (f"served {r['served']}, stored {r['stored']} ({r['stored_served']} of the served "
            f"ids, missing {r['missing']}{extra}); stored == served: "
            f"{verdict(r['missing'] == 0)}")


def sustained(results: list[dict], default: str | None) -> list[str]:
    rows = [r for r in results if r["scenario"] == "sustained"]
    if not rows:
        return []
    r0 = rows[0]
    head = (f"{'export':<18} {'served':>7} {'req/s':>6} {'stored':>7} {'missing':>7} "
            f"{'preview':>7} {'dropped':>7} {'queue peak':>20} {'drain s':>8} {'stored/s':>8} "
            f"{'gw us/req':>9} {'MLflow ms/trace':>15} {'steal':>5} {'busy':>5}")
    out = [f"sustained: {r0['conns']} connections for {r0['load_seconds']:.0f} s, then the "
           f"drain; queue peak = traces / MiB / oldest s",
           head, "-" * len(head)]
    for r in rows:
        drain = f"{r['drain_seconds']:.0f}" + ("" if r["drained"] else "+")
        out.append(
            f"{label(r):<18} {r['served']:>7} {r['served'] / r['load_seconds']:>6.0f} "
            f"{r['stored']:>7} {r['missing']:>7} {r['with_preview']:>7} {dropped(r):>7} "
            f"{queue_peak(r):>20} {drain:>8} {stored_per_second(r):>8.1f} "
            f"{per(r.get('gateway_cpu_s'), r['served'], 1e6):>9} "
            f"{per(r.get('mlflow_cpu_s'), r['stored'], 1e3):>15} "
            f"{r.get('steal_pct', 0):>4.0f}% {r.get('busy_pct', 0):>4.0f}%")
    left = [r for r in rows if not r["drained"]]
    for r in left:
        out.append(f"  {label(r)}: not drained within the limit, {r['left_in_queue']:.0f} left "
                   f"in the queue (delivered later by a gateway that keeps running; kept on "
                   f"disk over a restart with a queue directory)")
    today = next((r for r in rows if r["mode"] == "today"), None)
    if today and today["stored"]:
        for r in rows:
            if r is today or (default and r["mode"] != default):
                continue
            ratio = r["stored"] / today["stored"]
            out.append(f"  floor: stored with {label(r)} / today = {ratio:.1f}x "
                       f"(target >= 3x: {verdict(ratio >= 3)})")
    return out + [""]


def drain_words(r: dict) -> str:
    if r["drained"]:
        return f"drained in {r['drain_seconds']:.0f} s"
    return (f"not drained within {r['drain_seconds']:.0f} s: {r['left_in_queue'] or 0:.0f} left "
            f"in the queue")


def outage(results: list[dict]) -> list[str]:
    out = []
    for r in (r for r in results if r["scenario"] == "outage"):
        out.append(f"outage ({label(r)}): {r['conns']} connections for {r['load_seconds']:.0f} "
                   f"s ({r['served'] / r['load_seconds']:.0f} req/s), MLflow down "
                   f"{r['down_seconds']:.0f} s with {r.get('queued_at_resume')} traces queued "
                   f"at its restart; {drain_words(r)}; queue peak "
                   f"{queue_peak(r)}; dropped {dropped(r)}")
        out.append(f"  {lost_line(r)}")
    return out + [""] if out else []


def restart(results: list[dict]) -> list[str]:
    out = []
    for r in (r for r in results if r["scenario"] == "restart"):
        out.append(f"restart, SIG{r['signal']} ({label(r)}): {r['conns']} connections for "
                   f"{r['load_seconds']:.0f} s; the gateway exited {r['exit_seconds']:.1f} s "
                   f"after the signal (status {r['exit_status']}) with "
                   f"{r.get('queued_before')} traces queued at the last scrape before it, "
                   f"{r['queue_dir_bytes_at_restart']} bytes in its queue directory; the new "
                   f"one recovered {r.get('recovered')} traces from disk; {drain_words(r)}; "
                   f"client errors {sum(r['client_errors'].values())}")
        out.append(f"  {lost_line(r)}")
    return out + [""] if out else []


LEGEND = ("served = 2xx answers the clients received (each with its x-mlflow-trace-id); stored = "
          "traces in the experiment through MLflow's search-traces API; missing = served ids "
          "MLflow does not hold; preview = stored traces with a request preview (their spans "
          "arrived); dropped = the gateway's traces_dropped_total; drain s = after the load, "
          "until the queue was empty ('+': the limit was hit); stored/s = stored / (load + "
          "drain); gw us/req = the gateway's CPU (user+sys, /proc) over load and drain / served; "
          "MLflow ms/trace = MLflow's CPU (server and workers) over the same time / stored; "
          "steal = CPU time the hypervisor took meanwhile; busy = the machine's busy CPU time "
          "meanwhile, this benchmark's processes and anything else")


def render(results: list[dict], ds, ncpu: int) -> str:
    lines = [f"delivery benchmark: fake upstream answering in {ds.delay_ms} ms, closed-loop "
             f"clients, MLflow {mlflow_version()} (sqlite, 2 workers, a fresh server per run), "
             f"{ncpu} CPUs"]
    lines += [*sustained(results, ds.mode), *outage(results), *restart(results), LEGEND]
    return "\n".join(lines) + "\n"
