"""wrk's text output parsed into numbers."""
import unittest

from ..load import parse_wrk

WRK_LATENCY = """Running 2s test @ http://127.0.0.1:41234/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.33us  301.12us   8.12ms   91.23%
    Req/Sec    38.12k     2.31k   42.10k    70.00%
  Latency Distribution
     50%  350.00us
     75%  480.00us
     90%  650.00us
     99%    1.60ms
  151234 requests in 2.00s, 68.12MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:  75580.12
Transfer/sec:     34.04MB
"""


class ParseWrk(unittest.TestCase):
    def test_a_measured_run_gives_every_figure_in_ms(self):
        r = parse_wrk(WRK_LATENCY)
        self.assertEqual(r["requests"], 151234)
        self.assertAlmostEqual(r["rps"], 75580.12)
        self.assertAlmostEqual(r["p50"], 0.35)
        self.assertAlmostEqual(r["p75"], 0.48)
        self.assertAlmostEqual(r["p90"], 0.65)
        self.assertAlmostEqual(r["p99"], 1.6)
        self.assertEqual(r["socket_errors"], 3)
        self.assertEqual(r["timeouts"], 2)
        self.assertEqual(r["non2xx"], 5)

    def test_seconds_and_minutes_are_converted(self):
        text = "     50%    2.68s \n     99%    1.50m \n  10 requests in 2.00s, 1KB read\n"
        r = parse_wrk(text)
        self.assertAlmostEqual(r["p50"], 2680.0)
        self.assertAlmostEqual(r["p99"], 90000.0)

    def test_the_thread_stats_latency_line_is_not_a_percentile(self):
        # "+/- Stdev" and "91.23%" in the stats table must not be read as p-values
        r = parse_wrk(WRK_LATENCY.replace("  Latency Distribution", "").split("     50%")[0])
        self.assertNotIn("p50", r)
        self.assertNotIn("p99", r)

    def test_a_warm_up_without_latency_or_errors_has_zero_errors(self):
        text = ("Running 1s test @ http://x\n  2 threads and 8 connections\n"
                "  100 requests in 1.00s, 40KB read\nRequests/sec:    100.00\n")
        self.assertEqual(parse_wrk(text), dict(requests=100, rps=100.0, socket_errors=0,
                                               timeouts=0, non2xx=0))

    def test_an_empty_output_is_all_zeros(self):
        self.assertEqual(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n"),
                         dict(requests=0, rps=0.0, socket_errors=0, timeouts=0, non2xx=0))


if __name__ == "__main__":
    unittest.main()
