"""A local PostgreSQL for when no `DATABASE_URL` is given.

The binaries come from the `pgserver` package, so nothing is installed by hand.
PostgreSQL refuses to run as root; pgserver then runs it as a dedicated system
user, which is what CI (root) needs. The server listens on a Unix socket only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class EmbeddedPostgres:
    """One PostgreSQL server under `data_dir`, shared by every process that asks
    for the same directory and stopped when the last of them lets go."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.resolve() / "postgres"
        self._server: Any = None

    def start(self) -> str:
        """Starts (or joins) the server and returns a connection URL."""
        import pgserver  # imported here: loading its binaries' paths is not free

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        url: str = self._server.get_uri()
        logger.info("embedded PostgreSQL ready under %s", self.pgdata)
        return url

    def stop(self) -> None:
        """Lets go of the server; it stops when no other process uses it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
