"""Imported by every Python process that has this folder on PYTHONPATH (tests/test_launched_processes.py puts it
there for the command under test; the command's processes inherit it): in a rank of a bigtrain command's launch
(RANK set; `bigtrain.cli.train` or `bigtrain.cli.convert_worker`), tell the test where the rank is by writing a
line to the FIFO BIGTRAIN_TEST_NOTIFY, at the moment BIGTRAIN_TEST_HOLD names:

    start   at once, before any bigtrain code runs (then it waits here until it is killed: a rank starting up)
    work    a training rank: after it logs its first step (it trains on); a convert rank: as it starts writing the
            layout-free form (then it waits there until it is killed)

Every other process is left alone."""

import os
import threading


def _notify(what: str) -> None:
    fd = os.open(os.environ["BIGTRAIN_TEST_NOTIFY"], os.O_WRONLY)
    try:
        os.write(fd, f"{what} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def _install(hold: str, module: str) -> None:
    if hold == "start":
        _notify("start")
        threading.Event().wait()  # a rank stuck in start-up, until it is killed
    elif module == "bigtrain.cli.train":
        from bigtrain.train.metrics import MetricsLog

        write, sent = MetricsLog.write, []

        def write_then_notify(self, record):
            write(self, record)
            if "loss" in record and not sent:
                sent.append(record["step"])
                _notify("work")

        MetricsLog.write = write_then_notify
    else:
        import bigtrain.checkpoint.convert as convert

        def notify_and_wait(staging, *args, **kwargs):
            os.makedirs(staging, exist_ok=True)  # as the real writer would have
            _notify("work")
            threading.Event().wait()

        convert.write_layout_free = notify_and_wait


_hold = os.environ.get("BIGTRAIN_TEST_HOLD")
if _hold and "RANK" in os.environ and "BIGTRAIN_TEST_NOTIFY" in os.environ:
    with open("/proc/self/cmdline", "rb") as _f:
        _argv = _f.read().split(b"\0")
    for _module in ("bigtrain.cli.train", "bigtrain.cli.convert_worker"):
        if _module.encode() in _argv:
            _install(_hold, _module)
