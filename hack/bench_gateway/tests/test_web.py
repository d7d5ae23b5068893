"""Prometheus sums and the check request's body."""
import json
import re
import unittest

from ..load import LUA
from ..web import chat_body, metric_sum

METRICS = """# HELP mlflow_gateway_requests_total Requests answered.
# TYPE mlflow_gateway_requests_total counter
mlflow_gateway_requests_total{endpoint="bench",status="200"} 1500
mlflow_gateway_requests_total{endpoint="bench",status="502"} 3
mlflow_gateway_requests_total_extra 99
mlflow_gateway_trace_export_queue_spans 0
mlflow_gateway_traces_exported_total 12.0
"""


class MetricSum(unittest.TestCase):
    def test_every_label_set_is_summed(self):
        self.assertEqual(metric_sum(METRICS, "mlflow_gateway_requests_total"), 1503)

    def test_a_metric_without_labels(self):
        self.assertEqual(metric_sum(METRICS, "mlflow_gateway_traces_exported_total"), 12)
        self.assertEqual(metric_sum(METRICS, "mlflow_gateway_trace_export_queue_spans"), 0)

    def test_a_missing_metric_is_zero(self):
        self.assertEqual(metric_sum(METRICS, "mlflow_gateway_spans_dropped_total"), 0)


class ChatBody(unittest.TestCase):
    def test_the_check_request_is_the_body_wrk_sends(self):
        # wrk's Lua builds the body by concatenation: the same bytes as chat_body's
        pieces = re.findall(r"'([^']*)'", LUA)
        lua_body = pieces[0] + "gpt-4o-mini" + "".join(pieces[1:])
        self.assertEqual(lua_body.encode(), chat_body("gpt-4o-mini"))
        self.assertEqual(json.loads(chat_body("bench"))["model"], "bench")


if __name__ == "__main__":
    unittest.main()
