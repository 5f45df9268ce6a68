"""``opendps audit list|verify``: the tamper-evident audit log.

``list`` is a client of ``GET /auditLog`` like the other management verbs. ``verify`` asks the server
(``GET /auditLog/verify``) or, with ``--local`` (or ``--db``), reads the database itself: an operator auditing a
server should not have to take that server's word for it, and needs only read access to the database (no key: the
chain is plain SHA-256). Either way it exits 0 when the chain is intact and 1 with one line naming the first bad
entry otherwise.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from opendps.cli import CliError, non_empty_path, output_option
from opendps.cli._client import Client, resolve_connection
from opendps.cli.management import api_command
from opendps.cli.output import emit

COLUMNS = ["sequenceNumber", "time", "action", "actor", "namespace", "deviceId", "subject"]
_AGE = re.compile(r"^(\d{1,9})([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def register(main: click.Group) -> None:
    main.add_command(audit)


def when(value: str | None, name: str) -> str | None:
    """An ISO 8601 time as given, or an age (``30m``, ``24h``, ``7d``) turned into the time that long ago."""
    if value is None:
        return None
    age = _AGE.match(value.strip())
    if age:
        then = datetime.now(UTC) - timedelta(**{_UNITS[age.group(2)]: int(age.group(1))})
        return then.isoformat().replace("+00:00", "Z")
    try:
        datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise CliError(f"{name} must be an ISO 8601 time (2026-12-06T10:00:00Z) or an age such as 30m, 24h or 7d, "
                       f"not {value!r}") from exc
    return value.strip()


@click.group()
def audit() -> None:
    """The tamper-evident audit log: every issuance, revocation, CA and enrollment change and registration outcome,
    as a hash chain."""


@audit.command("list")
@click.option("--device-id", "-d", "device_id", default=None, help="Only this device's entries (its registration id).")
@click.option("--namespace", "--ns", "namespace", default=None, help="Only entries of this namespace.")
@click.option("--action", "-a", default=None,
              help="Only this action (certificate.issued) or family (certificate: issued and revoked).")
@click.option("--since", default=None, help="From this time on: ISO 8601, or an age such as 30m, 24h, 7d.")
@click.option("--until", default=None, help="Before this time: ISO 8601, or an age.")
@click.option("--top", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="At most this many entries (newest first).")
@click.option("--before", type=click.IntRange(min=1), default=None,
              help="Only entries before this sequence number (the next page: the last one listed).")
@api_command
def audit_list(client: Client, output: str, device_id: str | None, namespace: str | None, action: str | None,
               since: str | None, until: str | None, top: int, before: int | None) -> None:
    """List audit entries, newest first."""
    params = {k: v for k, v in (("deviceId", device_id), ("namespace", namespace), ("action", action),
                                ("since", when(since, "--since")), ("until", when(until, "--until")),
                                ("top", str(top)), ("before", str(before) if before else None)) if v}
    body = client.exchange("GET", "/auditLog", params=params)[0] or {}
    emit(body.get("value", []), output, COLUMNS)


@audit.command("verify")
@click.option("--local", is_flag=True, default=False,
              help="Check the database directly (the data directory's, or --db) instead of asking the server.")
@click.option("--db", "db_url", default=None, help="Database URL to check directly (implies --local; default: the "
              "data directory's, $OPENDPS_DB).")
@click.option("--expect-head", "expect_head", default=None, metavar="SEQ:HASH",
              help="An entry an earlier check printed (its number and hash): it must still be there, unchanged "
                   "(catches entries cut from the end of the log).")
@click.option("--login", "-l", default=None, metavar="CONNECTION_STRING",
              help="Service connection string (default $OPENDPS_CONNECTION_STRING, else the local data directory).")
@click.option("--data-dir", type=click.Path(), default=None, callback=non_empty_path,
              help="Data directory (default $OPENDPS_DATA_DIR or ./.opendps): its database with --local, else its "
                   "connection.")
@click.option("--ca-file", type=click.Path(path_type=Path), default=None,
              help="PEM CA certificate to trust for the server (default $OPENDPS_CA_FILE, else the data directory's).")
@output_option(default="none")
def audit_verify(local: bool, db_url: str | None, expect_head: str | None, login: str | None, data_dir: Path | None,
                 ca_file: Path | None, output: str) -> None:
    """Check the hash chain: exit 0 when intact (one line with the head to keep), 1 naming the first bad entry.

    With -o json (or table, yaml, tsv) the whole result is printed as well."""
    head = _head(expect_head)
    if local or db_url is not None:  # --db '' is a bad URL to refuse, not "ask the server"
        result = _verify_locally(data_dir, db_url, head)
    else:
        client = Client(resolve_connection(login, data_dir, ca_file))
        try:
            params = {"expectHead": f"{head[0]}:{head[1]}"} if head else None
            result = client.exchange("GET", "/auditLog/verify", params=params)[0] or {}
        finally:
            client.close()
    if output != "none":
        emit(result, output)
    if not result.get("intact"):
        raise CliError(str(result.get("message") or "audit log broken"))
    if output == "none":
        click.echo(result.get("message", "audit log intact"))


def _head(value: str | None) -> tuple[int, str] | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,19}):([0-9A-Fa-f]{64})\s*", value)
    if m is None or int(m.group(1)) < 1:
        raise CliError(f"--expect-head must be SEQ:HASH (an entry's number and its 64 hex digits), not {value!r}")
    return int(m.group(1)), m.group(2).lower()


def _verify_locally(data_dir: Path | None, db_url: str | None, head: tuple[int, str] | None) -> dict[str, Any]:
    """The check on the database itself: read only (no migration, no file created)."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from opendps.audit import AuditLog
    from opendps.errors import ConfigurationError
    from opendps.instance import Settings, one_line, redacted_db_url
    from opendps.store import Store

    try:
        settings = Settings.load(data_dir, db=db_url)
        settings.check()
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    url = settings.db_url
    database = make_url(url).database
    if url.startswith("sqlite") and (not database or not Path(database).is_file()):
        raise CliError(f"no database at {database or url}: pass --data-dir or --db")
    store = Store(url)
    try:
        try:
            has_log = inspect(store.engine).has_table("audit_log")
        except Exception as exc:  # the drivers raise many kinds; one line
            # the driver's own message, without SQLAlchemy's "(psycopg.OperationalError) ... (Background on this
            # error at: https://sqlalche.me/...)" wrapper around it
            raise CliError(f"cannot read the database {redacted_db_url(url)}: {one_line(exc)}") from exc
        if not has_log:
            raise CliError(f"the database {redacted_db_url(url)} has no audit log: run 'opendps db upgrade'")
        try:
            return AuditLog(store).verify(expect_head=head).to_wire()
        except SQLAlchemyError as exc:  # a table not as opendps made it (a column dropped or renamed), the database
            # gone meanwhile, no right to read it: one line, not a traceback
            raise CliError(f"cannot check the audit log in {redacted_db_url(url)}: {one_line(exc)}") from exc
    finally:
        store.dispose()
