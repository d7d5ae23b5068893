"""CPU accounting from /proc text: a process's ticks, a tree's ticks, the hypervisor's steal."""
import unittest

from ..cpu import busy_pct, parse_cpu_line, parse_pid_stat, steal_pct, tree_ticks

# A /proc/PID/stat line whose command name holds a space and a parenthesis.
PID_STAT = ("4242 (mlflow (worker) 1) S 4000 4000 4000 0 -1 4194560 2611 0 0 0 150 25 30 7 20 0 "
            "5 0 123456 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 "
            "1 0 0 0 0 0")

STAT = """cpu  1000 10 500 8000 40 0 20 430 0 0
cpu0 500 5 250 4000 20 0 10 215 0 0
intr 12345
"""


class ProcessTicks(unittest.TestCase):
    def test_own_and_reaped_childrens_ticks_counted_after_the_last_parenthesis(self):
        # utime 150 + stime 25 + cutime 30 + cstime 7
        self.assertEqual(parse_pid_stat(PID_STAT), (4000, 4000, 212))

    def test_a_tree_holds_descendants_and_group_members_only(self):
        procs = {
            100: (1, 100, 10),   # the root
            101: (100, 100, 20),  # its child
            102: (101, 100, 30),  # a grandchild
            200: (1, 100, 40),   # reparented to init but in the root's process group
            300: (1, 300, 50),   # unrelated
            301: (300, 300, 60),  # unrelated child
        }
        self.assertEqual(tree_ticks(procs, {100}), 100)
        self.assertEqual(tree_ticks(procs, {101}), 50)
        self.assertEqual(tree_ticks(procs, {100, 300}), 210)
        self.assertEqual(tree_ticks(procs, set()), 0)


class Steal(unittest.TestCase):
    def test_the_cpu_line_gives_the_first_eight_counters(self):
        self.assertEqual(parse_cpu_line(STAT), [1000, 10, 500, 8000, 40, 0, 20, 430])

    def test_another_first_line_is_refused(self):
        with self.assertRaises(ValueError):
            parse_cpu_line("intr 1 2 3\n")

    def test_steal_is_its_share_of_all_time_between_readings(self):
        before = [1000, 10, 500, 8000, 40, 0, 20, 430]
        after = [1300, 10, 600, 8400, 40, 0, 20, 630]  # +300 +100 +400 +200 = 1000 ticks
        self.assertAlmostEqual(steal_pct(before, after), 20.0)

    def test_no_time_elapsed_is_no_steal(self):
        line = [1, 2, 3, 4, 5, 6, 7, 8]
        self.assertEqual(steal_pct(line, line), 0.0)

    def test_busy_is_all_but_idle_iowait_and_steal(self):
        before = [1000, 10, 500, 8000, 40, 0, 20, 430]
        after = [1300, 10, 600, 8400, 40, 0, 20, 630]  # user 300 + system 100 of 1000 ticks
        self.assertAlmostEqual(busy_pct(before, after), 40.0)


if __name__ == "__main__":
    unittest.main()
