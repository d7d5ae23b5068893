"""The session's bookkeeping: what it starts ends at close, bounded runs end in time. These start
`sleep` processes (the only tests here that run anything), each stopped by pid."""
import signal
import subprocess
import time
import unittest

from ..processes import Session, free_port, run_bounded


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


class SessionClose(unittest.TestCase):
    def test_close_stops_every_process_and_removes_the_run_directory(self):
        # What SIGINT did before (a background job started without job control ignores it).
        before = signal.getsignal(signal.SIGINT)
        session = Session(keep=False)
        procs = [session.start(f"sleep-{i}", ["sleep", "60"]) for i in range(2)]
        seen = []
        session.on_cleanup(lambda keep: seen.append(keep))
        session.close(failed=False)
        self.assertFalse(any(alive(p.pid) for p in procs))
        self.assertIs(signal.getsignal(signal.SIGINT), before)
        self.assertEqual(seen, [False])
        self.assertFalse(session.run.exists())

    def test_a_failed_run_keeps_its_directory_and_a_failing_cleanup_does_not_stop_the_rest(self):
        session = Session(keep=False)
        seen = []
        session.on_cleanup(lambda keep: seen.append(keep))
        session.on_cleanup(lambda keep: 1 / 0)
        session.close(failed=True)
        try:
            self.assertEqual(seen, [True])
            self.assertTrue(session.run.is_dir())
        finally:
            subprocess.run(["rm", "-rf", str(session.run)], check=True)

    def test_a_stopped_process_is_not_stopped_again(self):
        session = Session(keep=False)
        proc = session.start("sleep", ["sleep", "60"])
        session.stop(proc)
        self.assertFalse(alive(proc.pid))
        session.close(failed=False)


class Bounded(unittest.TestCase):
    def test_a_command_past_its_time_is_killed(self):
        t0 = time.monotonic()
        self.assertIsNone(run_bounded(["sleep", "30"], 0.2))
        self.assertLess(time.monotonic() - t0, 5)

    def test_a_command_in_time_gives_its_status(self):
        self.assertEqual(run_bounded(["sh", "-c", "exit 3"], 10), 3)


class FreePort(unittest.TestCase):
    def test_a_port_on_loopback(self):
        self.assertGreater(free_port(), 0)


if __name__ == "__main__":
    unittest.main()
