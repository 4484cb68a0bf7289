"""A local PostgreSQL for when no `DATABASE_URL` is given.

By default the binaries come from the `pgserver` package, so nothing is
installed by hand. Where pgserver cannot be imported (no wheel for the
platform), or when `CONVERGE_POSTGRES_BIN_DIR` names a directory of
PostgreSQL binaries (`initdb`, `pg_ctl`), those are used instead: the ones on
the PATH as a fallback, or the ones named.

PostgreSQL refuses to run as root; as root the server then runs as a
dedicated system user, which is what CI (root) needs. The server listens on a
Unix socket only. Its log (`<data dir>/postgres/log`) is kept free of the
values in failing statements (see LOG_SETTINGS).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BIN_DIR_VARIABLE = "CONVERGE_POSTGRES_BIN_DIR"
SYSTEM_USER = "converge-postgres"
START_TIMEOUT_S = 60

# What PostgreSQL writes to its log must not carry personal data. An error's
# DETAIL holds the values of the key it is about (a unique violation's
# "Key (email)=(...)"), and a failing or slow statement's text and bind
# parameters may hold anything, so neither is logged; the error's one-line
# message and SQLSTATE still are. (README, Configuration: the same for an
# external server.)
LOG_SETTINGS = {
    "log_error_verbosity": "terse",  # no DETAIL, HINT, QUERY or CONTEXT lines
    "log_min_error_statement": "panic",  # no STATEMENT line with an error
    "log_statement": "none",
    "log_min_duration_statement": "-1",
    "log_parameter_max_length": "0",
    "log_parameter_max_length_on_error": "0",
}


class EmbeddedPostgres:
    """One PostgreSQL server under `data_dir`, shared by every process that asks
    for the same directory. With pgserver it stops when the last of them lets
    go; with binaries of the machine, when the process that started it does."""

    def __init__(self, data_dir: Path, bin_dir: Path | None = None) -> None:
        self.pgdata = data_dir.resolve() / "postgres"
        named = bin_dir or os.environ.get(BIN_DIR_VARIABLE)
        self.bin_dir: Path | None = Path(named) if named else None
        self._server: Any = None
        self._binaries: _BinariesServer | None = None

    def start(self) -> str:
        """Starts (or joins) the server and returns a connection URL."""
        if self.bin_dir is None:
            try:
                import pgserver  # imported here: loading its binaries' paths is not free
            except ImportError:
                self.bin_dir = _bin_dir_on_path()
                logger.warning(
                    "pgserver cannot be imported; using PostgreSQL from %s", self.bin_dir
                )
            else:
                self.pgdata.parent.mkdir(parents=True, exist_ok=True)
                self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
                url: str = self._server.get_uri()
                self._apply_log_settings()
                logger.info("embedded PostgreSQL ready under %s", self.pgdata)
                return url
        # Another major version than pgserver's: its own data directory.
        self._binaries = _BinariesServer(self.bin_dir, self.pgdata.with_name("postgres-local"))
        return self._binaries.start()

    def _apply_log_settings(self) -> None:
        """LOG_SETTINGS on pgserver's server, which starts with its own
        options: kept in postgresql.auto.conf and reloaded, and only then
        returns, once a new session sees them."""
        script = "".join(f"ALTER SYSTEM SET {k} = '{v}';\n" for k, v in LOG_SETTINGS.items())
        self._server.psql(script + "SELECT pg_reload_conf();\n")
        for _ in range(200):  # the reload is a signal: usually done at once
            if "terse" in self._server.psql("SHOW log_error_verbosity;\n"):
                return
            time.sleep(0.01)
        raise RuntimeError("the embedded PostgreSQL did not take its log settings")

    def stop(self) -> None:
        """Lets go of the server (see the class)."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
        if self._binaries is not None:
            self._binaries.stop()
            self._binaries = None


def _bin_dir_on_path() -> Path:
    found = shutil.which("pg_ctl")
    if found is None:
        raise RuntimeError(
            "no PostgreSQL: pgserver cannot be imported and pg_ctl is not on the PATH; "
            f"install one, set {BIN_DIR_VARIABLE}, or set DATABASE_URL"
        )
    return Path(found).resolve().parent


class _BinariesServer:
    """initdb and pg_ctl of a PostgreSQL installed on the machine."""

    def __init__(self, bin_dir: Path, pgdata: Path) -> None:
        self.bin_dir = bin_dir
        self.pgdata = pgdata
        self.started_here = False
        self.user = SYSTEM_USER if os.geteuid() == 0 else None

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        as_user: dict[str, Any] = {}
        if self.user is not None:  # its own group too: root's would hide "other" bits
            entry = pwd.getpwnam(self.user)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        return subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            **as_user,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )

    def start(self) -> str:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            _ensure_user(self.user)
            _let_user_reach(self.pgdata, self.user)
        socket_dir = self._socket_dir()
        if self._run("pg_ctl", "status", "-D", str(self.pgdata)).returncode != 0:
            if not (self.pgdata / "PG_VERSION").exists():
                self._check(
                    self._run(
                        "initdb", "-D", str(self.pgdata), "-U", "postgres",
                        "-A", "trust", "-E", "UTF8", "--no-instructions",
                    )
                )  # fmt: skip
            options = f"-c listen_addresses='' -k {socket_dir}" + "".join(
                f" -c {name}={value}" for name, value in LOG_SETTINGS.items()
            )
            self._check(
                self._run(
                    "pg_ctl", "start", "-w", "-D", str(self.pgdata),
                    "-l", str(self.pgdata / "log"), "-o", options,
                )
            )  # fmt: skip
            self.started_here = True
        logger.info("local PostgreSQL from %s ready under %s", self.bin_dir, self.pgdata)
        return f"postgresql://postgres@/postgres?host={socket_dir}"

    def stop(self) -> None:
        if self.started_here:
            self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.pgdata))
            self.started_here = False

    def _socket_dir(self) -> Path:
        """A short directory for the socket (a socket path has at most ~100
        bytes; test directories are longer), remembered beside the data."""
        remembered = self.pgdata.with_name(self.pgdata.name + ".socket")  # (initdb wants it empty)
        if remembered.exists() and Path(remembered.read_text()).is_dir():
            return Path(remembered.read_text())
        socket_dir = Path(tempfile.mkdtemp(prefix="cvpg-"))
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(socket_dir, entry.pw_uid, entry.pw_gid)
        remembered.write_text(str(socket_dir))
        return socket_dir

    @staticmethod
    def _check(done: subprocess.CompletedProcess[str]) -> None:
        if done.returncode != 0:
            raise RuntimeError(
                f"{done.args[0]} failed: {done.stderr.strip() or done.stdout.strip()}"
            )


def _ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)


def _let_user_reach(pgdata: Path, user: str) -> None:
    """The data directory owned by `user`, and every directory above it
    traversable, as PostgreSQL needs (test directories are private to root)."""
    entry = pwd.getpwnam(user)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    pgdata.chmod(0o700)
    for parent in pgdata.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
