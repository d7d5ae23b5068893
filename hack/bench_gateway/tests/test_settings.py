"""The BENCH_* environment read into settings."""
import unittest

from ..settings import ALL_TARGETS, REPO_ROOT, SettingsError, from_env


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


if __name__ == "__main__":
    unittest.main()
