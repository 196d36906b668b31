"""A real one-node Slurm cluster for the tests: MUNGE, slurmctld and slurmd from Debian's packages, started in a
temporary directory with their own slurm.conf, ports and MUNGE socket (a Slurm already on the machine is left
alone). `sbatch` then runs batch scripts and `srun` steps for real.

    cluster = LocalSlurm.start()             # installs the packages first if missing (root + apt-get)
    job = cluster.sbatch([...], env)         # job id
    cluster.wait(job)                        # final JobState, ExitCode, Restarts
    cluster.stop()

Two settings differ from a production cluster so that tests take seconds: `cred_expire=5` (a requeued job may
start again after ~6 s instead of ~2 min) and a 1 s scheduling interval.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bigtrain.distributed.rendezvous import free_port

INSTALL = Path(__file__).with_name("install_slurm.sh")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
SBIN = ("/usr/sbin", "/usr/bin")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def unavailable_reason() -> str | None:
    """Why a local cluster cannot run here (None: it can), installing the packages first when possible."""
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    if not all(_which(b) for b in BINARIES):
        proc = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not all(_which(b) for b in BINARIES):
            return f"Slurm/MUNGE are not installed and could not be installed: {proc.stderr.strip()[-300:]}"
    return None


@dataclass
class JobEnd:
    state: str
    exit_code: str  # "status:signal", as scontrol prints it
    restarts: int


class LocalSlurm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls) -> LocalSlurm:
        """A cluster in a fresh directory under /tmp (the munge user must reach its socket)."""
        import tempfile

        cluster = cls(Path(tempfile.mkdtemp(prefix="bigtrain-slurm-")))
        try:
            cluster._start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self) -> None:
        root = self.root
        for d in ("munge", "state", "spool", "log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(root / "munge", "munge", "munge")
        shutil.chown(key, "munge", "munge")
        root.chmod(0o755)
        socket_path = root / "munge" / "munge.socket"
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged"), f"--socket={socket_path}",
                        f"--key-file={key}", f"--pid-file={root / 'munge' / 'munged.pid'}",
                        f"--log-file={root / 'munge' / 'munged.log'}", f"--seed-file={root / 'munge' / 'seed'}"],
                       check=True, capture_output=True, timeout=30)
        self.conf.write_text(f"""ClusterName=bigtrain-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=5
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=localhost CPUs={os.cpu_count() or 2} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run([_which("slurmctld"), "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", "localhost"], check=True, env=self.env,
                       timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run([_which("sinfo"), "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            if out.stdout.strip() == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"the local Slurm node did not become idle in 30 s; logs in {root / 'log'}")

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        proc = subprocess.run([_which("sbatch"), "--parsable", *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=cwd, timeout=60)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = subprocess.run([_which("scontrol"), "show", "job", "-o", job_id], capture_output=True, text=True,
                             env=self.env, timeout=30).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: str, timeout: float = 300, until: tuple[str, ...] = ("COMPLETED", "FAILED",
                                                                                  "CANCELLED", "TIMEOUT",
                                                                                  "NODE_FAIL", "OUT_OF_MEMORY")
             ) -> JobEnd:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return JobEnd(info["JobState"], info.get("ExitCode", ""), int(info.get("Restarts", 0)))
            time.sleep(0.5)
        subprocess.run([_which("scancel"), job_id], env=self.env)
        raise TimeoutError(f"job {job_id} did not end in {timeout} s: {self.job(job_id)}")

    def scancel(self, *args: str) -> None:
        subprocess.run([_which("scancel"), *args], check=True, env=self.env, timeout=30)

    def stop(self) -> None:
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)
