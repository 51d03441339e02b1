"""Bring up a real single-node Slurm cluster for tests (wraps ``scripts/slurm-local.sh``).

Needs root on Debian/Ubuntu: installs ``slurmctld slurmd slurm-client slurmdbd munge
mariadb-server-core mariadb-client-core`` with apt when the binaries are missing, then starts
munged, mariadbd, slurmdbd, slurmctld and slurmd with every file under ``tmp_dir``. One node
(``hostname -s``, all CPUs and memory), one partition ``debug``; ``sacct`` works, so submitit's
``AutoExecutor(folder, cluster="slurm")`` and ``SlurmJob(folder, job_id).state`` work.

Usage in a fixture::

    from tests import slurm_local

    @pytest.fixture(scope="session")
    def slurm_cluster(tmp_path_factory):
        info = slurm_local.start_local_slurm(tmp_path_factory.mktemp("slurm"))
        if info is None:
            pytest.skip(f"no local Slurm: {slurm_local.last_error}")
        yield info
        slurm_local.stop_local_slurm(info)

``start_local_slurm`` returns ``None`` when Slurm cannot be brought up and leaves the one-line
reason in ``slurm_local.last_error``; ``require_local_slurm`` raises ``SlurmUnavailable`` instead.
Keep ``tmp_dir`` short (<= 80 characters; unix socket paths live under it): ``tmp_path_factory``
directories are fine. Every subprocess call has a timeout, so none of this can hang.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm-local.sh"
# Binaries the script needs; any missing one triggers ``slurm-local.sh install``.
BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "sinfo", "sbatch", "squeue", "sacct",
            "scancel", "mariadbd", "mariadb-install-db", "mariadb")

last_error: str | None = None
"""Why the last ``start_local_slurm`` / ``stop_local_slurm`` call failed (``None`` after success)."""


class SlurmUnavailable(RuntimeError):
    """Slurm could not be brought up (not root, no apt, install or daemon start failed)."""


def _run(args: list[str], timeout: float, **extra_env: str) -> str:
    """Run the script; return stdout, or raise SlurmUnavailable with a one-line reason."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env.update(extra_env)
    try:
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"slurm-local.sh {args[0]} timed out after {timeout:.0f}s") from None
    except OSError as exc:
        raise SlurmUnavailable(f"cannot run {SCRIPT}: {exc}") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise SlurmUnavailable(f"slurm-local.sh {args[0]} failed: {reason}")
    return proc.stdout


def require_local_slurm(tmp_dir: str | os.PathLike[str], *, install_timeout: float = 900,
                        start_timeout: float = 60) -> dict:
    """Install (if needed) and start the cluster under ``tmp_dir``; raise ``SlurmUnavailable``.

    Sets ``os.environ["SLURM_CONF"]`` (restored by ``stop_local_slurm``) and returns
    ``{"dir", "slurm_conf", "partition", "log_dir", "prev_slurm_conf"}``.
    """
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise SlurmUnavailable("needs root (apt-get install and daemons running as root)")
    if not SCRIPT.is_file():
        raise SlurmUnavailable(f"{SCRIPT} not found")
    if shutil.which("bash") is None:
        raise SlurmUnavailable("bash not found")
    if any(shutil.which(b) is None for b in BINARIES):
        if shutil.which("apt-get") is None:
            raise SlurmUnavailable("Slurm binaries missing and apt-get not available")
        _run(["install"], install_timeout)
    directory = Path(tmp_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    # The script gives up by itself after start_timeout seconds (and stops what it started);
    # the outer timeout only guards against the script itself getting stuck.
    _run(["start", str(directory)], start_timeout + 60, SLURM_LOCAL_START_TIMEOUT=str(int(start_timeout)))
    info = {
        "dir": str(directory),
        "slurm_conf": str(directory / "slurm.conf"),
        "partition": "debug",
        "log_dir": str(directory / "log"),
        "prev_slurm_conf": os.environ.get("SLURM_CONF"),
    }
    os.environ["SLURM_CONF"] = info["slurm_conf"]
    return info


def start_local_slurm(tmp_dir: str | os.PathLike[str], **kwargs: float) -> dict | None:
    """Like ``require_local_slurm`` but returns ``None`` on failure, reason in ``last_error``."""
    global last_error
    try:
        info = require_local_slurm(tmp_dir, **kwargs)
    except SlurmUnavailable as exc:
        last_error = str(exc)
        return None
    last_error = None
    return info


def stop_local_slurm(info: dict | None, timeout: float = 90) -> bool:
    """Stop the cluster's daemons (only those) and restore ``SLURM_CONF``; never raises.

    Returns False (reason in ``last_error``) if some daemon could not be stopped.
    """
    global last_error
    if not info:
        return True
    if os.environ.get("SLURM_CONF") == info["slurm_conf"]:
        if info.get("prev_slurm_conf") is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = info["prev_slurm_conf"]
    try:
        _run(["stop", info["dir"]], timeout)
    except SlurmUnavailable as exc:
        last_error = str(exc)
        return False
    last_error = None
    return True
