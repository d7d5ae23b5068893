"""The benchmark's run: tools, the nginx instances, then each wanted row in a fixed order
(direct, nginx, off, on, on-nice, sink, mlflow), then the report. All processes belong to one
Session, closed on every exit."""
import os
import shutil
import sys

from . import gateway, nginx, report
from .load import Load
from .mlflow import run_mlflow_gateway
from .processes import BenchError, Session, exit_status, free_port
from .settings import REPO_ROOT, Settings, SettingsError, from_env
from .tools import ensure_tools, gateway_binary
from .web import check_target


def main() -> int:
    try:
        settings = from_env()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.chdir(REPO_ROOT)
    session = None
    status = 0
    try:
        ensure_tools()
        rows_of_ours = [r for r in ("off", "on", "on-nice", "sink") if settings.wants(r)]
        have_gateway = bool(rows_of_ours) and gateway_binary(settings)
        session = Session(settings.keep)
        run(session, settings, have_gateway)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    except BaseException as e:  # Ctrl-C, SIGTERM, a bug: the session still cleans up
        status = exit_status(e)
        if status == 1:
            raise  # a bug: its traceback is worth more than a one-line message
    finally:
        if session:
            session.close(failed=status != 0)
    return status


def run(session: Session, settings: Settings, have_gateway: bool) -> None:
    load = Load(session, settings)
    fake_port, proxy_port = free_port(), free_port()
    workers = settings.nginx_workers
    fake = nginx.Nginx(session, "fake", workers, nginx.fake_server(fake_port))
    proxy = nginx.Nginx(session, "proxy", workers, nginx.proxy_server(proxy_port, fake_port))
    fake_pid, proxy_pid = fake.start(), proxy.start()
    direct_url = f"http://127.0.0.1:{fake_port}/v1/chat/completions"
    proxy_url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
    nginx.wait_posts([direct_url, proxy_url])

    if settings.wants("direct"):
        if not check_target(direct_url, "gpt-4o-mini"):
            raise BenchError("the fake upstream does not answer")
        load.bench("direct", "direct (nginx fake upstream)", direct_url, "gpt-4o-mini", [fake_pid])
    if settings.wants("nginx"):
        if check_target(proxy_url, "gpt-4o-mini"):
            load.bench("nginx", "nginx reverse proxy", proxy_url, "gpt-4o-mini", [proxy_pid])
        else:
            load.skip("nginx", "nginx reverse proxy", "check request failed")

    for row in ("off", "on", "on-nice", "sink"):
        if not settings.wants(row):
            continue
        if not have_gateway:
            load.skip(row, gateway.LABELS[row], f"no gateway subcommand in {settings.binary}")
        elif row == "off":
            gateway.run_off(session, settings, load, fake_port)
        elif row == "sink":
            gateway.run_sink(session, settings, load, fake_port)
        else:
            gateway.run_traced_mlflow(session, settings, load, fake_port, row,
                                      nice=19 if row == "on-nice" else 0)

    if settings.wants("mlflow"):
        run_mlflow_gateway(session, load, fake_port, settings.drain_timeout)

    if settings.json_out:
        shutil.copyfile(load.results, settings.json_out)
    info = report.RunInfo(threads=settings.threads, duration=settings.duration,
                          warmup=settings.warmup, response_bytes=len(nginx.RESPONSE),
                          ncpu=len(os.sched_getaffinity(0)), nginx_workers=settings.nginx_workers)
    sys.stdout.write(report.render(load.rows(), load.traced_rows(), info))
