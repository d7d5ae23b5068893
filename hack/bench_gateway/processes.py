"""Everything the benchmark starts, and its end: the run directory, free ports, background
processes (each stopped by pid), bounded foreground commands, and the cleanup that runs on
every exit.

One `Session` owns all of it so that no exit path (a finished run, an error, Ctrl-C, SIGTERM)
can leave a process behind: `main` closes it in a `finally`, and cleanup steps that are not
processes (MLflow servers, whose `hack/mlflow.sh` knows how to stop them) register a callback.
"""
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path


class BenchError(Exception):
    """A failure that ends the benchmark: printed as `error: ...`, exit status 1."""


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel picks it; a tiny race remains until the server
    binds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Exit(BaseException):
    """SIGTERM or SIGHUP turned into an exception, so that `finally` blocks run."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _raise_exit(signum, _frame):
    raise _Exit(128 + signum)


def exit_status(error: BaseException) -> int:
    """The exit status for an exception that ended the run (130 for Ctrl-C, as a shell does)."""
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, _Exit):
        return error.status
    return 1


class Session:
    """The run directory and every process started in it."""

    def __init__(self, keep: bool):
        self.run = Path(tempfile.mkdtemp(prefix="mgo-bench-gw."))
        self.keep = keep
        self._procs: dict[int, subprocess.Popen] = {}
        self._cleanups = []  # callables taking `keep`, run last-registered first
        self._handlers = {sig: signal.getsignal(sig)
                          for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_exit)

    def start(self, name: str, argv, env=None) -> subprocess.Popen:
        """Starts `argv` in the background, output to RUN/NAME.log, stdin from /dev/null."""
        with open(self.run / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        self._procs[proc.pid] = proc
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """Stops one process started by `start`: TERM, KILL after 10 s."""
        self._procs.pop(proc.pid, None)
        _stop(proc)

    def end(self, proc: subprocess.Popen, sig, grace: float) -> float:
        """Ends one process started by `start` with signal `sig` (SIGKILL after `grace` s if it
        is still running, as a kubelet does); returns the seconds it took to exit."""
        self._procs.pop(proc.pid, None)
        t0 = time.monotonic()
        _signal(proc, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return time.monotonic() - t0

    def on_cleanup(self, callback) -> None:
        """Registers `callback(keep)` to run at close, before the run directory goes."""
        self._cleanups.append(callback)

    def wait_http(self, url: str, proc: subprocess.Popen, seconds: float, name: str) -> None:
        """Waits (at most `seconds`) until GET `url` answers 2xx while `proc` lives."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None:
                self._tail(name)
                raise BenchError(f"{name} exited during start (log: {self.run}/{name}.log)")
            if time.monotonic() >= deadline:
                self._tail(name)
                raise BenchError(f"{name} did not answer {url} within {seconds:.0f} s")
            time.sleep(0.1)

    def _tail(self, name: str) -> None:
        try:
            lines = (self.run / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return
        print("\n".join(lines[-20:]), file=sys.stderr)

    def close(self, failed: bool) -> None:
        """Stops every process still running, runs the cleanups, removes the run directory
        unless it is kept (BENCH_KEEP=1 or a failed run). Signals are ignored meanwhile, so a
        second Ctrl-C cannot cut the cleanup short; their handlers are restored after."""
        for sig in self._handlers:
            signal.signal(sig, signal.SIG_IGN)
        try:
            self._close(failed)
        finally:
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)

    def _close(self, failed: bool) -> None:
        procs = list(self._procs.values())
        self._procs.clear()
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        for proc in procs:
            _stop(proc)
        keep = self.keep or failed
        for callback in reversed(self._cleanups):
            try:
                callback(keep)
            except Exception as e:  # one failed cleanup must not skip the others
                log(f"warning: cleanup step failed: {e}")
        if keep:
            log(f"run directory kept: {self.run}")
        else:
            shutil.rmtree(self.run, ignore_errors=True)


def _signal(proc: subprocess.Popen, sig) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _stop(proc: subprocess.Popen) -> None:
    _signal(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_bounded(argv, timeout: float, **popen_args) -> int | None:
    """Runs `argv` in the foreground, killed after `timeout` s and on Ctrl-C or any exception
    (and then waited for: subprocess.run does not wait for a child it kills on Ctrl-C). Returns
    its exit status, None if it timed out."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **popen_args)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
