"""CPU accounting from /proc: the CPU seconds a server (with its workers) used, and the share of
the machine's time the hypervisor stole, both read before and after each measured run.

The parsing is apart from the reading (`parse_*` take text) so that it is unit-tested without a
live /proc.
"""
import os
from pathlib import Path

PROC = Path("/proc")


def parse_pid_stat(text: str) -> tuple[int, int, int]:
    """(ppid, process group, CPU clock ticks) from a /proc/PID/stat line: its own utime + stime
    and the cutime + cstime of the children it has reaped, so that a worker that dies during a
    run (uvicorn restarts unresponsive ones) still counts, in its parent, and a tree's total
    never goes down. The command name (field 2) may hold spaces and parentheses, so fields are
    counted after its last ')'."""
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): ppid is field 4, pgrp 5, utime 14, stime 15, cutime 16,
    # cstime 17
    return int(fields[1]), int(fields[2]), sum(int(f) for f in fields[11:15])


def tree_ticks(procs: dict[int, tuple[int, int, int]], roots: set[int]) -> int:
    """Clock ticks used by the processes in `procs` (pid -> parse_pid_stat) that are a root, a
    descendant of one (up to 64 levels), or in a process group a root leads (MLflow's workers).
    A process's threads are in its own counters; a reaped child's are in its parent's."""

    def ours(pid):
        if procs[pid][1] in roots:
            return True
        for _ in range(64):
            if pid in roots:
                return True
            pid = procs.get(pid, (0,))[0]
            if pid <= 1:
                return False
        return False

    return sum(v[2] for pid, v in procs.items() if ours(pid))


def _processes() -> dict[int, tuple[int, int, int]]:
    procs = {}
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        try:
            procs[int(entry)] = parse_pid_stat((PROC / entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    return procs


def cpu_seconds(*pids: int) -> float:
    """CPU seconds (user + sys) used so far by the processes under `pids` (see tree_ticks)."""
    return tree_ticks(_processes(), set(pids)) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (children first, then theirs)."""
    procs = _processes()
    found, frontier = [], [pid]
    while frontier:
        parents = set(frontier)
        frontier = [p for p, v in procs.items() if v[0] in parents]
        found.extend(frontier)
    return found


def parse_cpu_line(text: str) -> list[int]:
    """The first 8 counters (user nice system idle iowait irq softirq steal) of /proc/stat's
    aggregate `cpu` line."""
    first = text.splitlines()[0].split()
    if first[0] != "cpu":
        raise ValueError(f"not /proc/stat's cpu line: {first[0]!r}")
    return [int(v) for v in first[1:9]]


def read_cpu_line() -> list[int]:
    return parse_cpu_line((PROC / "stat").read_text())


def steal_pct(before: list[int], after: list[int]) -> float:
    """The share (%) of the machine's CPU time between two /proc/stat readings that the
    hypervisor gave to other machines (figures of a run with much of it are not comparable)."""
    d = [b - a for a, b in zip(before, after)]
    return 100.0 * d[7] / max(1, sum(d))


def busy_pct(before: list[int], after: list[int]) -> float:
    """The share (%) of the machine's CPU time between two /proc/stat readings that was busy
    (neither idle nor iowait, steal excluded): with what this benchmark's own processes used,
    it tells how much else ran on the machine meanwhile."""
    d = [b - a for a, b in zip(before, after)]
    return 100.0 * (sum(d) - d[3] - d[4] - d[7]) / max(1, sum(d))


def loadavg() -> float:
    """The 1-minute load average (/proc/loadavg)."""
    return float((PROC / "loadavg").read_text().split()[0])


def renice_tree(pid: int, nice: int) -> None:
    """Sets `pid` and its descendants to niceness `nice`, and its scheduler autogroup too: a
    server started with setsid has an autogroup of its own, whose weight against the others' is
    the autogroup's nice, not the processes'."""
    for p in [pid, *children(pid)]:
        try:
            os.setpriority(os.PRIO_PROCESS, p, nice)
        except ProcessLookupError:
            pass
    autogroup = PROC / str(pid) / "autogroup"
    if os.access(autogroup, os.W_OK):
        autogroup.write_text(f"{nice}\n")
