"""A private PostgreSQL server for the tests, from Debian's ``postgresql`` package.

The test run starts its own cluster (``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/<ver>/bin``)
in a temporary directory, listening on a free loopback port with trust authentication, and removes
it at the end of the session. Nothing of the machine's own PostgreSQL service is used or touched.
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user the package
creates (``runuser``), in a directory handed to that user.

It is never skipped: without the package (``hack/system-deps.sh`` installs it) the fixture fails
with a message saying what to install. Test modules declare two thin fixtures over
``shared_postgres`` (session: one server for every module) and ``fresh_database`` (per test).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

POSTGRES_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
_STASH = pytest.StashKey["PostgresServer"]()


class PostgresUnavailable(RuntimeError):
    """The test PostgreSQL server could not be started; the message says why."""


def find_bindir(root: Path = POSTGRES_ROOT) -> Path:
    """The newest installed PostgreSQL's bin directory (with initdb, pg_ctl and psql)."""
    candidates = []
    for version_dir in root.glob("*") if root.is_dir() else ():
        bindir = version_dir / "bin"
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "psql", "postgres")):
            try:
                candidates.append((int(version_dir.name), bindir))
            except ValueError:
                continue
    if not candidates:
        raise PostgresUnavailable(
            f"no PostgreSQL server binaries under {root}: install Debian's postgresql package "
            "(bash hack/system-deps.sh, or apt-get install postgresql)"
        )
    return max(candidates)[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """One running cluster: ``url(database)`` names a database on it."""

    directory: Path
    bindir: Path
    port: int
    run_as: tuple[str, ...]

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        return self.directory / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with the real psql client, as a user would; returns its unaligned output."""
        done = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"psql {sql!r} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _pg_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are closed) and remove its files."""
        try:
            if (self.data / "postmaster.pid").exists():
                done = self._pg_ctl("stop", "-m", "fast", "-w", "-t", "30")
                if done.returncode != 0:
                    self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "30")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _run_as() -> tuple[tuple[str, ...], int | None, int | None]:
    """The command prefix that runs a server binary, and the uid/gid to own its files."""
    if os.geteuid() != 0:
        return (), None, None
    try:
        user = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise PostgresUnavailable(
            "running as root, and there is no postgres user to run the server as "
            "(Debian's postgresql package creates it)"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root, and runuser (util-linux) is missing")
    return (runuser, "-u", SUPERUSER, "--"), user.pw_uid, user.pw_gid


def start_postgres(attempts: int = 3) -> PostgresServer:
    """initdb a new cluster in a temporary directory and start it on a free loopback port."""
    bindir = find_bindir()
    run_as, uid, gid = _run_as()
    directory = Path(tempfile.mkdtemp(prefix="vkp-pg-"))
    if uid is not None and gid is not None:
        os.chown(directory, uid, gid)
    server = PostgresServer(directory=directory, bindir=bindir, port=0, run_as=run_as)
    try:
        init = subprocess.run(
            [
                *run_as,
                str(bindir / "initdb"),
                "-D",
                str(server.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({init.returncode}): {init.stderr.strip()[-2000:]}")
        problem = ""
        for _ in range(attempts):  # a free port may be taken between choosing and binding it
            server.port = free_port()
            # Sockets in our own directory (not /var/run/postgresql); fsync off: test data is disposable.
            options = f"-h 127.0.0.1 -p {server.port} -k {directory} -F -c max_connections=200"
            started = server._pg_ctl("start", "-w", "-t", "60", "-l", str(server.log_file), "-o", options, timeout=90)
            if started.returncode == 0:
                return server
            log = server.log_file.read_text(errors="replace") if server.log_file.exists() else ""
            problem = f"{started.stderr.strip()} {started.stdout.strip()}\n{log[-2000:]}"
        raise PostgresUnavailable(f"pg_ctl start failed: {problem}")
    except BaseException:
        server.stop()
        raise


def shared_postgres(config: pytest.Config) -> PostgresServer:
    """The session's server: started on first use, stopped when the test session ends.

    Kept in the config's stash (not in a fixture's cache) so that every test module importing
    the fixture shares one server.
    """
    server = config.stash.get(_STASH, None)
    if server is None:
        server = start_postgres()
        config.stash[_STASH] = server
        config.add_cleanup(server.stop)
    return server


@contextmanager
def fresh_database(server: PostgresServer) -> Iterator[str]:
    """A new, empty database for one test; yields its ``postgresql://`` URL, drops it afterwards."""
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)
