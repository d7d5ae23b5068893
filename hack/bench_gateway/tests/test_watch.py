"""The metrics the delivery scenarios poll: parsing, picking by label, totals across restarts."""
import unittest

from ..watch import Totals, parse_exposition, pick, sample

EXPOSITION = """# HELP mlflow_gateway_trace_queue_traces Traces in the queue.
# TYPE mlflow_gateway_trace_queue_traces gauge
mlflow_gateway_trace_queue_traces 120
mlflow_gateway_trace_queue_bytes 524288
mlflow_gateway_trace_queue_oldest_age_seconds 3.5
mlflow_gateway_traces_delivered_total 900
mlflow_gateway_traces_dropped_total{reason="queue_full"} 7
mlflow_gateway_traces_dropped_total{reason="rejected"} 2
mlflow_gateway_trace_export_requests_total{kind="otlp",result="ok"} 30
mlflow_gateway_trace_export_requests_total{kind="trace_info",result="error"} 4
mlflow_gateway_requests_total{status="200",provider="openai"} 1000
mlflow_gateway_requests_total{status="502",provider="openai"} 3
# EOF
"""


class Parsing(unittest.TestCase):
    def test_samples_are_keyed_by_name_and_labels(self):
        parsed = parse_exposition(EXPOSITION)
        self.assertEqual(parsed[("mlflow_gateway_trace_queue_traces", ())], 120)
        key = ("mlflow_gateway_traces_dropped_total", (("reason", "rejected"),))
        self.assertEqual(parsed[key], 2)

    def test_pick_sums_the_samples_with_the_labels_asked(self):
        parsed = parse_exposition(EXPOSITION)
        self.assertEqual(pick(parsed, "mlflow_gateway_requests_total"), 1003)
        self.assertEqual(pick(parsed, "mlflow_gateway_requests_total", status="502"), 3)
        self.assertIsNone(pick(parsed, "mlflow_gateway_nothing"))

    def test_a_sample_has_the_scenario_figures_only_when_present(self):
        s = sample(parse_exposition(EXPOSITION))
        self.assertEqual(s["trace_queue_traces"], 120)
        self.assertEqual(s["traces_dropped_total"], 9)
        self.assertEqual((s["dropped_queue_full"], s["dropped_rejected"]), (7, 2))
        self.assertEqual((s["export_otlp_ok"], s["export_trace_info_error"]), (30, 4))
        self.assertNotIn("trace_export_queue_spans", s)  # today's name, absent here
        self.assertNotIn("export_otlp_error", s)

    def test_todays_names_are_read_too(self):
        s = sample(parse_exposition("mlflow_gateway_trace_export_queue_spans 4096\n"
                                    "mlflow_gateway_traces_exported_total 50\n"
                                    "mlflow_gateway_traces_dropped_total 817\n"))
        self.assertEqual((s["trace_export_queue_spans"], s["traces_exported_total"],
                          s["traces_dropped_total"]), (4096, 50, 817))


class TotalsAcrossRestarts(unittest.TestCase):
    def test_gauges_keep_their_peak_and_counters_add_up_across_a_reset(self):
        t = Totals()
        t.add({"trace_queue_traces": 10, "traces_delivered_total": 100})
        t.add({"trace_queue_traces": 50, "traces_delivered_total": 150})
        t.add({"trace_queue_traces": 5, "traces_delivered_total": 20})  # a new process
        self.assertEqual(t.peak["trace_queue_traces"], 50)
        self.assertEqual(t.gauge("trace_queue_traces"), 5)
        self.assertEqual(t.total("traces_delivered_total"), 170)

    def test_a_declared_restart_keeps_the_old_count_even_if_the_new_one_is_higher(self):
        t = Totals()
        t.add({"traces_delivered_total": 100})
        t.restarted()
        self.assertEqual(t.total("traces_delivered_total"), 100)
        t.add({"traces_delivered_total": 300})
        self.assertEqual(t.total("traces_delivered_total"), 400)
        self.assertIsNone(t.total("traces_dropped_total"))


if __name__ == "__main__":
    unittest.main()
