"""The BENCH_* environment read into settings."""
import unittest

from ..settings import (ALL_TARGETS, EXPORT_MODES, REPO_ROOT, SCENARIOS, SettingsError,
                        delivery_from_env, from_env)


class Settings(unittest.TestCase):
    def test_defaults_are_the_documented_ones(self):
        s = from_env({})
        self.assertEqual((s.duration, s.warmup, s.connections, s.threads, s.wrk_timeout),
                         (10, 2, (32, 128), 2, 10))
        self.assertEqual(s.targets, frozenset(ALL_TARGETS))
        self.assertEqual(s.nginx_workers, "auto")
        self.assertTrue(s.build)
        self.assertFalse(s.keep)
        self.assertEqual(s.binary, REPO_ROOT / "target/release/mlflow-gateway-operator")
        self.assertIsNone(s.json_out)
        self.assertEqual(s.drain_timeout, 120)

    def test_knobs_are_read(self):
        s = from_env(dict(BENCH_DURATION="2", BENCH_WARMUP="0", BENCH_CONNECTIONS=" 8  16 ",
                          BENCH_TARGETS="direct sink", BENCH_BUILD="0", BENCH_KEEP="1",
                          BENCH_BIN="target/debug/mlflow-gateway-operator",
                          BENCH_JSON="/tmp/x.json"))
        self.assertEqual((s.duration, s.warmup, s.connections), (2, 0, (8, 16)))
        self.assertTrue(s.wants("sink") and not s.wants("off"))
        self.assertFalse(s.build)
        self.assertTrue(s.keep)
        self.assertEqual(s.binary, REPO_ROOT / "target/debug/mlflow-gateway-operator")
        self.assertEqual(str(s.json_out), "/tmp/x.json")

    def test_a_wrong_value_names_its_variable(self):
        for env, name in ((dict(BENCH_DURATION="ten"), "BENCH_DURATION"),
                          (dict(BENCH_DURATION="0"), "BENCH_DURATION"),
                          (dict(BENCH_CONNECTIONS="32,128"), "BENCH_CONNECTIONS"),
                          (dict(BENCH_TARGETS="direct gateway"), "BENCH_TARGETS")):
            with self.assertRaisesRegex(SettingsError, name):
                from_env(env)


class DeliverySettings(unittest.TestCase):
    def test_defaults_are_the_issues_figures(self):
        d = delivery_from_env({})
        self.assertEqual(d.scenarios, SCENARIOS)
        self.assertEqual(d.modes, EXPORT_MODES)
        self.assertIsNone(d.mode)
        self.assertIsNone(d.old_binary)
        self.assertEqual((d.delay_ms, d.sustain_seconds, d.sustain_connections), (200, 180, 40))
        self.assertEqual((d.outage_connections, d.outage_seconds, d.outage_lead), (4, 120, 30))
        self.assertEqual(d.restart_signals, ("TERM", "KILL"))
        self.assertIsNone(d.queue_max_bytes)
        self.assertEqual(d.fake_binary, REPO_ROOT / "target/release/fake-llm")

    def test_knobs_are_read(self):
        d = delivery_from_env(dict(BENCH_SCENARIOS="outage", BENCH_MODES="", BENCH_MODE="adaptive",
                                   BENCH_OLD_BIN="/tmp/old/gw", BENCH_QUEUE_MAX_BYTES="1048576",
                                   BENCH_RESTART_SIGNALS="KILL"))
        self.assertEqual((d.scenarios, d.modes, d.mode), (("outage",), (), "adaptive"))
        self.assertEqual(str(d.old_binary), "/tmp/old/gw")
        self.assertEqual((d.queue_max_bytes, d.restart_signals), (1048576, ("KILL",)))

    def test_a_wrong_value_names_its_variable(self):
        for env, name in ((dict(BENCH_MODE="fast"), "BENCH_MODE"),
                          (dict(BENCH_MODES="spans-only batched"), "BENCH_MODES"),
                          (dict(BENCH_SCENARIOS="burst"), "BENCH_SCENARIOS"),
                          (dict(BENCH_RESTART_SIGNALS="HUP"), "BENCH_RESTART_SIGNALS"),
                          (dict(BENCH_SUSTAIN_SECONDS="0"), "BENCH_SUSTAIN_SECONDS")):
            with self.assertRaisesRegex(SettingsError, name):
                delivery_from_env(env)


if __name__ == "__main__":
    unittest.main()
