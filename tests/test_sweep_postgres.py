"""Two worker processes share one study on a real PostgreSQL server: no trial lost or duplicated.

The server is ``$TUNEPILOT_TEST_POSTGRES_URL`` when set; otherwise a throwaway cluster started
from the PostgreSQL binaries (Debian's ``postgresql`` package, which ``.ci/run`` installs) and
removed afterwards; without either the test is skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.test_sweep import sweep_config
from tunepilot.sweep import storage

ROOT = Path(__file__).resolve().parents[1]


def _pg_bin() -> Path | None:
    """The newest installed server's binaries (Debian keeps them out of PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _version(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    if os.environ.get("TUNEPILOT_TEST_POSTGRES_URL"):
        yield os.environ["TUNEPILOT_TEST_POSTGRES_URL"]
        return
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (install Debian's postgresql package)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server")
        as_user = ["runuser", "-u", "postgres", "--"]
    # not pytest's tmp_path: its parents are private to root, and the server runs as postgres
    home = Path(tempfile.mkdtemp(prefix="tunepilot-pg-"))
    if as_user:
        shutil.chown(home, "postgres")
    data, port = home / "data", _free_port()

    def pg(tool: str, *args: str) -> None:
        # cwd: the postgres user may not be allowed into ours
        subprocess.run(
            [*as_user, str(bin_dir / tool), *args], check=True, capture_output=True, cwd=home
        )

    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        # TCP on 127.0.0.1 only; the socket in our own dir (the default one may not exist)
        server = f"-h 127.0.0.1 -p {port} -k {home}"
        pg("pg_ctl", "-D", str(data), "-l", str(home / "log"), "-w", "-o", server, "start")
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "tunepilot")
        yield f"postgresql://postgres@127.0.0.1:{port}/tunepilot"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                cwd=home,
            )
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_share_one_postgres_study(postgres_url: str, tmp_path: Path, tiny_model_dir):
    config = sweep_config(tmp_path, tiny_model_dir)
    name = f"test-{uuid.uuid4().hex[:8]}"  # a fresh study even on a shared server
    out = tmp_path / "sweep"  # both workers write into one output dir, as on a shared disk
    argv = [sys.executable, "-m", "tunepilot", "sweep", str(config), "--trials", "3"]
    argv += ["--storage", postgres_url, "--study", name, "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    workers = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)

    url = storage.parse(postgres_url).render_as_string(hide_password=False)
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert sorted(t.number for t in trials) == [0, 1, 2]  # none duplicated, none beyond 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)  # none lost
    assert all(t.params for t in trials)
    # every trial ran in exactly one of the two processes
    ran = [int(log.split(" run by this process")[0].rsplit("(", 1)[1]) for log in logs]
    assert sum(ran) == 3, "\n".join(logs)
    for t in trials:
        assert (out / "trials" / f"trial-{t.number:03d}" / "trial.json").is_file()
    assert (out / "best.yaml").is_file()
