"""What the benchmark needs on the machine: nginx and wrk (Debian packages, installed with apt
when missing), and this gateway's binary (built with cargo unless BENCH_BUILD=0)."""
import os
import shutil
import subprocess

from .processes import BenchError, log
from .settings import REPO_ROOT, Settings


def ensure_tools() -> None:
    """Puts /usr/sbin and /sbin on PATH (Debian's nginx lives there) and installs what is
    missing of nginx and wrk with apt-get (through sudo unless root), updating the package
    lists once if the first attempt fails."""
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if not missing:
        return
    log(f"installing {' '.join(missing)} (Debian packages)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]

    def apt(*args):
        return subprocess.run([*sudo, "apt-get", *args], stdout=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL).returncode == 0

    install = ("install", "-y", "-qq", *missing)
    if not (apt(*install) or (apt("update", "-qq") and apt(*install))):
        raise BenchError(f"could not install {' '.join(missing)} with apt-get")


def gateway_binary(settings: Settings) -> bool:
    """Builds the release binary unless BENCH_BUILD=0; whether BENCH_BIN has a working
    `gateway` subcommand (if not, this gateway's rows are skipped)."""
    if settings.build:
        log("cargo build --release --locked")
        if subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"],
                          cwd=REPO_ROOT).returncode != 0:
            raise BenchError("cargo build --release --locked failed")
    try:
        works = subprocess.run([str(settings.binary), "gateway", "--help"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    if not works:
        log(f"warning: {settings.binary} has no working 'gateway' subcommand: the rows of this "
            f"gateway are skipped")
    return works
