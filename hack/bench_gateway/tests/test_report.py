"""The report's arithmetic and wording, from made-up results."""
import unittest

from ..report import RunInfo, render, tracing_cost

INFO = RunInfo(threads=2, duration=10, warmup=2, response_bytes=359, ncpu=2, nginx_workers="auto")


def run(row, label, conc, rps, p50, p99, requests, cpu_s, **extra):
    return dict(requests=requests, rps=rps, p50=p50, p75=p50, p90=p99, p99=p99, socket_errors=0,
                timeouts=0, non2xx=0, row=row, label=label, conc=conc, cpu_s=cpu_s,
                side_cpu_s=0.0, steal_pct=1.0, **extra)


ROWS = [
    run("direct", "direct (nginx fake upstream)", 32, 60000.0, 0.4, 6.0, 600000, 6.0),
    run("nginx", "nginx reverse proxy", 32, 40000.0, 0.6, 4.0, 400000, 8.8),
    run("off", "this gateway, tracing off", 32, 20000.0, 1.4, 3.5, 200000, 12.0),
    run("on", "this gateway, tracing on", 32, 19000.0, 1.6, 9.7, 190000, 9.5)
    | dict(side_cpu_s=8.2),
    dict(row="sink", label="this gateway, tracing on, sink", conc=32, skipped="check failed"),
    run("mlflow", "MLflow gateway 3.17.2", 32, 10.0, 2680.0, 4090.0, 50, 10.9),
]

TRACES = [
    dict(row="on", stored=40, rooted=40, spans_stored=80, answered=200000, wrk_completed=200032,
         exported=50000, spans_exported=100000, dropped=30, dropped_traces=149000, failed=2,
         experiment="1", receiver_cpu_s=144.04, nice=0),
    dict(row="mlflow", stored=120, rooted=119, spans_stored=360, answered=130, wrk_completed=128,
         experiment="2"),
]


class Report(unittest.TestCase):
    def setUp(self):
        self.text = render(ROWS, TRACES, INFO)
        self.lines = self.text.splitlines()

    def line(self, start):
        return next(line for line in self.lines if line.startswith(start))

    def test_the_header_says_how_the_run_was_made(self):
        self.assertEqual(self.lines[0], "gateway benchmark: wrk, 2 threads, 10 s per run (+2 s "
                         "warm-up), fixed 359-byte response, 2 CPUs, nginx worker_processes auto")

    def test_a_row_has_cpu_per_request_steal_and_latency_added_over_direct(self):
        self.assertEqual(
            self.line("this gateway, tracing off"),
            "this gateway, tracing off        32     20000    1.400    3.500       0         60"
            "    1%  +1.000 / -2.500 ms")

    def test_direct_adds_nothing_to_itself(self):
        self.assertTrue(self.line("direct").endswith("1%  "))

    def test_a_skipped_row_says_why(self):
        self.assertEqual(self.line("this gateway, tracing on, sink"),
                         "this gateway, tracing on, sink   32  skipped: check failed")

    def test_the_trace_receivers_cpu_is_a_share_of_the_cores(self):
        self.assertIn("  this gateway, tracing on, conc 32: MLflow used 8.2 CPU s in 10 s (41% of "
                      "2 cores), the gateway 9.5 CPU s", self.lines)

    def test_ratios_against_the_targets(self):
        ratios = self.line("  conc 32: ")
        self.assertIn("this gateway (tracing on) / MLflow gateway = 1900.0x (target >= 10x: met)",
                      ratios)
        self.assertIn("cost of tracing on = 5.0% (target < 10%: met; 25.0% of its traces were "
                      "exported)", ratios)
        self.assertIn("tracing on vs nginx proxy = 48% (target >= 50%: MISSED)", ratios)
        self.assertIn("vs nginx proxy, tracing off = 50%", ratios)
        self.assertIn("added p99 (tracing off) = -2.500 ms (target < 1 ms: met)", ratios)
        self.assertIn("added p99 (tracing on) = 3.700 ms (target < 1 ms: MISSED)", ratios)
        self.assertNotIn("sink", ratios)

    def test_trace_counts_of_the_tracing_row_and_of_mlflows_gateway(self):
        self.assertIn("  this gateway, tracing on: 200000 requests answered (its requests counter;"
                      " wrk completed 200032 incl. warm-ups); exported 50000 traces (25.0% of"
                      " them; root span and trace info stored), 100000 spans; dropped 149000"
                      " traces whole at their start and 30 spans in all (export queue full);"
                      " failed 2 spans (MLflow did not accept)", self.lines)
        self.assertIn("    MLflow (experiment 1, nice 0) holds 40 traces (40 with their root span),"
                      " 80 spans; that server (--workers 2) used 144.0 CPU s meanwhile, on the"
                      " same cores", self.lines)
        self.assertTrue(self.line("  MLflow gateway: 130 requests answered").endswith(
            "(up to conc per wrk run)"))

    def test_the_cpu_table_gives_each_servers_own_cpu_and_the_receivers_apart(self):
        start = self.lines.index("CPU per request (each server's own, from /proc):")
        table = self.lines[start + 3:start + 6]
        self.assertEqual(table[0].split(), ["nginx", "reverse", "proxy", "32", "22", "1%"])
        self.assertEqual(table[1].split()[-3:], ["32", "60", "1%"])
        # on: 9.5 s / 190000 = 50 us, -17% against off's 60; MLflow 144.04 s / 40 stored traces
        self.assertEqual(table[2].split()[-8:],
                         ["32", "50", "-17%", "25.0%", "MLflow", "3601", "ms/stored", "1%"])

    def test_a_run_under_two_requests_per_connection_is_noted_as_coarse(self):
        self.assertIn("note: MLflow gateway 3.17.2 at conc 32 completed 50 requests, under 2 per"
                      " connection: its req/s and percentiles are coarse (a longer BENCH_DURATION"
                      " steadies them)", self.lines)
        self.assertEqual(sum(line.startswith("note:") for line in self.lines), 1)

    def test_the_legend_ends_the_report(self):
        self.assertTrue(self.lines[-1].startswith("errors = non-2xx answers + socket errors"))

    def test_rows_without_tracing_print_no_trace_section(self):
        text = render(ROWS[:3], [], INFO)
        self.assertNotIn("traces:", text)
        self.assertNotIn("trace receiver", text)

    def test_a_traced_row_that_answered_nothing_still_reports(self):
        traces = [dict(TRACES[0], answered=0)]
        self.assertIn("exported 50000 traces (- of them", render(ROWS, traces, INFO))


class TracingCost(unittest.TestCase):
    def test_the_throughput_lost_against_tracing_off(self):
        self.assertAlmostEqual(tracing_cost(20000.0, 15000.0), 25.0)
        self.assertAlmostEqual(tracing_cost(20000.0, 21000.0), -5.0)


if __name__ == "__main__":
    unittest.main()
