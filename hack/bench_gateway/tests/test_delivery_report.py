"""The delivery report's arithmetic and verdicts, from made-up results."""
import unittest
from types import SimpleNamespace

from ..delivery_report import queue_peak, render, stored_per_second

DS = SimpleNamespace(delay_ms=200, mode="spans-only")


def run(**kw):
    r = dict(row="r", scenario="sustained", mode="spans-only", conns=40, served=36000,
             load_seconds=180.0, stored=36000, stored_served=36000, missing=0, extra=0,
             with_preview=36000, drain_seconds=60.0, drained=True, left_in_queue=0,
             totals={"traces_dropped_total": 0}, statuses={200: 36000}, client_errors={},
             peaks={"trace_queue_traces": 9000, "trace_queue_bytes": 30 * (1 << 20),
                    "trace_queue_oldest_age_seconds": 44.2},
             gateway_cpu_s=7.2, mlflow_cpu_s=360.0, steal_pct=2.0, busy_pct=80.0)
    r.update(kw)
    return r


class Figures(unittest.TestCase):
    def test_queue_peak_of_both_generations(self):
        self.assertEqual(queue_peak(run()), "9000 / 30.0 / 44")
        self.assertEqual(queue_peak(run(peaks={"trace_export_queue_spans": 4096})), "4096 spans")
        self.assertEqual(queue_peak(run(peaks={})), "-")

    def test_stored_per_second_counts_the_drain(self):
        self.assertAlmostEqual(stored_per_second(run()), 150.0)


class Report(unittest.TestCase):
    def test_the_sustained_table_and_the_floor_against_today(self):
        today = run(mode="today", stored=7200, missing=28800, with_preview=7000,
                    peaks={"trace_export_queue_spans": 4096},
                    totals={"traces_dropped_total": 28000})
        out = render([today, run(), run(mode="info-then-spans", stored=14400, missing=21600)],
                     DS, ncpu=2)
        self.assertIn("today (8846bd5)", out)
        # CPU: 7.2 s / 36000 requests = 200 us; 360 s / 36000 traces = 10 ms
        line = next(l for l in out.splitlines() if l.startswith("spans-only"))
        self.assertIn(" 200 ", line)
        self.assertIn(" 10 ", line)
        # only the default mode (BENCH_MODE) is held to the floor: 36000 / 7200 = 5x
        self.assertIn("floor: stored with spans-only / today = 5.0x (target >= 3x: met)", out)
        self.assertNotIn("floor: stored with info-then-spans", out)

    def test_without_a_default_every_mode_gets_its_ratio(self):
        today = run(mode="today", stored=7200)
        out = render([today, run(mode="info-then-spans", stored=14400)],
                     SimpleNamespace(delay_ms=200, mode=None), ncpu=2)
        self.assertIn("info-then-spans / today = 2.0x (target >= 3x: MISSED)", out)

    def test_an_undrained_run_says_what_is_left(self):
        out = render([run(drained=False, left_in_queue=1234, drain_seconds=600.0)], DS, ncpu=2)
        self.assertIn("600+", out)
        self.assertIn("1234 left in the queue", out)

    def test_outage_and_restart_verdicts_are_on_missing_ids(self):
        outage = run(scenario="outage", conns=4, served=3600, stored=3600, stored_served=3600,
                     down_seconds=120.4, queued_at_resume=2400)
        lost = run(scenario="restart", signal="KILL", conns=20, served=6000, stored=5990,
                   stored_served=5990, missing=10, extra=1, exit_seconds=0.0, exit_status=-9,
                   queued_before=800, queue_dir_bytes_at_restart=2_000_000, recovered=790)
        out = render([outage, lost], DS, ncpu=2)
        self.assertIn("MLflow down 120 s with 2400 traces queued", out)
        self.assertIn("served 3600, stored 3600 (3600 of the served ids, missing 0); "
                      "stored == served: met", out)
        self.assertIn("restart, SIGKILL", out)
        self.assertIn("recovered 790 traces from disk", out)
        self.assertIn("missing 10, extra 1); stored == served: MISSED", out)
        self.assertIn("drained in 60 s", out)

    def test_an_outage_not_drained_says_what_is_left(self):
        out = render([run(scenario="outage", conns=4, served=3398, stored=885,
                          stored_served=885, missing=2513, drained=False, drain_seconds=300.0,
                          left_in_queue=2513.0, down_seconds=209.0, queued_at_resume=3053)],
                     DS, ncpu=2)
        self.assertIn("not drained within 300 s: 2513 left in the queue", out)


if __name__ == "__main__":
    unittest.main()
