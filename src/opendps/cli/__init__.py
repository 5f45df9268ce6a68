"""The ``opendps`` command: ``serve``, ``init``, ``info``, ``db upgrade`` and az-style management verbs.

Management verbs are clients of the REST API (cli/management.py); only the local verbs here open
the data directory directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from opendps.errors import ConfigurationError, OpenDPSError

if TYPE_CHECKING:
    from opendps.instance import Instance, Settings

_F = TypeVar("_F", bound=Callable[..., Any])

OUTPUT_FORMATS = ("json", "table", "tsv", "yaml", "none")  # az's, less its colourised variants
QUERY_META = "opendps.query"  # click context meta key: the compiled --query of the running command


def _remember_query(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Compile ``--query`` while parsing (a syntax error is a usage error) and keep it for :func:`output.emit`."""
    if value is not None:
        from opendps.cli.output import compile_query

        ctx.meta[QUERY_META] = compile_query(value)


def output_option(default: str = "json") -> Callable[[_F], _F]:
    """``-o/--output`` and ``--query`` as az has them; the verb passes its result to :func:`output.emit`."""
    fmt = click.option("-o", "--output", "output", type=click.Choice(OUTPUT_FORMATS), default=default,
                       show_default=True, help="Output format: json, table, tsv (tab-separated values, for shell "
                       "scripts), yaml or none.")
    query = click.option("--query", metavar="JMESPATH", expose_value=False, callback=_remember_query,
                         help="JMESPath query applied to the result before it is printed (as az's --query), "
                         "e.g. \"[].deviceId\".")

    def apply(f: _F) -> _F:
        return fmt(query(f))

    return apply


OUTPUT_OPTION = output_option()


def _one_line(message: str) -> str:
    """Errors are one line (click lists a Choice's values on lines of their own)."""
    return " ".join(message.split())


class CliError(click.ClickException):
    """One-line error and exit code 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def non_empty_path(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Path | None:
    """Why: an empty --data-dir was read as the current directory (Path('') is '.'), so a blank variable in a
    script made or used an instance wherever it stood; "." still names it on purpose."""
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter("must name a directory (it is empty)")
    return Path(value)


def data_dir_option(f: _F) -> _F:
    return click.option("--data-dir", type=click.Path(), default=None, callback=non_empty_path,
                        help="Data directory (default ./.opendps or $OPENDPS_DATA_DIR).")(f)


def _settings(data_dir: Path | None, **overrides: str | int | bool | None) -> Settings:
    from opendps.instance import Settings

    try:
        return Settings.load(data_dir, **overrides)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc


def server_options(f: _F) -> _F:
    f = click.option("--db", default=None, help="Database URL, e.g. postgresql+psycopg://user@host/db "
                     "(default SQLite in the data directory; $OPENDPS_DB).")(f)
    f = click.option("--host", default=None, help="Bind address (default 127.0.0.1).")(f)
    f = click.option("--hostname", default=None, help="Public host name put in server certificates "
                     "and connection strings (default localhost).")(f)
    f = click.option("--https-port", type=click.IntRange(1, 65535), default=None, help="HTTPS port (default 8443).")(f)
    f = click.option("--mqtt-port", type=click.IntRange(1, 65535), default=None, help="MQTT port (default 8883).")(f)
    f = click.option("--amqp-port", type=click.IntRange(0, 65535), default=None,
                     help="AMQP port for service-side C2D, as azure-iot-hub sends it (default 5671; 0 = off).")(f)
    f = click.option("--http-port", type=click.IntRange(0, 65535), default=None,
                     help="Plain-HTTP port serving CRLs and OCSP to relying parties, named in every certificate "
                          "(default 8080; 0 = off: certificates then name the HTTPS port).")(f)
    f = click.option("--client-timeout", type=click.FloatRange(1, 3600), default=None,
                     help="Seconds a client may stay silent: between HTTPS requests (or sending one's header), or "
                          "on a DPS MQTT session (default 60); how long any client may leave what it is sent unread; "
                          "also the deadline to connect (TLS handshake, then MQTT CONNECT or AMQP open) when shorter "
                          "than 10 s.")(f)
    f = click.option("--sqlite-synchronous", type=click.Choice(["normal", "full"]), default=None,
                     help="SQLite only: when a commit reaches the disk. normal (the default): at checkpoints, so what "
                          "was answered survives the process dying but not a power cut; full: at every commit (a "
                          "PUBACK or an issued certificate survives a power cut too; slower writes).")(f)
    f = click.option("--sqlite-busy-timeout", type=click.FloatRange(0.1, 3600), default=None,
                     help="SQLite only: seconds a write waits for another process's lock on the database file (a "
                          "backup, the sqlite3 shell) before a device is answered 503 with Retry-After (default 10).")(f)
    f = click.option("--no-lint", is_flag=True, default=False,
                     help="Skip pre-issuance pkilint checks (faster; not recommended).")(f)
    f = click.option("--workers", type=click.IntRange(0, 256), default=None,
                     help="Server processes on this host, on the same ports (default 0: one per core on PostgreSQL, "
                          "one on SQLite).")(f)
    f = click.option("--bus", default=None, help="NATS server carrying live hub state between processes and nodes, "
                     "e.g. nats://127.0.0.1:4222 (default: the database's own: LISTEN/NOTIFY on PostgreSQL; $OPENDPS_BUS); saved "
                     "for the next start; 'store' goes back to the database's own.")(f)
    return key_options(data_dir_option(f))


def key_options(f: _F) -> _F:
    """Where CA keys are kept: in the database (software) or on a PKCS#11 token (opendps.pki.pkcs11)."""
    f = click.option("--key-backend", type=click.Choice(["software", "pkcs11"]), default=None,
                     help="Where new CA keys are generated: encrypted in the database (software, the default) or on "
                          "a PKCS#11 token (pkcs11); kept by the installation, so given once (init).")(f)
    f = click.option("--pkcs11-module", default=None, metavar="PATH",
                     help="The HSM's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so (kept in config.json).")(f)
    f = click.option("--pkcs11-token-label", default=None, metavar="LABEL",
                     help="The token holding the CA keys (kept by the installation).")(f)
    f = click.option("--pkcs11-pin-file", default=None, metavar="FILE",
                     help="A file holding the token's user PIN (default: $OPENDPS_PKCS11_PIN); the PIN itself is "
                          "never written to config.json.")(f)
    return f


def _open(settings: Settings, create: bool = True, persist: bool = True) -> Instance:
    from opendps.instance import open_instance

    try:
        # read-only verbs do not migrate: they must not change a database another version serves
        inst = open_instance(settings, create=create, migrate=create, persist=persist)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    for warning in settings.warnings:
        click.echo(f"warning: {warning}", err=True)
    return inst


def _not_utf8(args: Sequence[str], failed: str) -> str | None:
    """The argument that is not UTF-8 (Python decodes such argv bytes to lone surrogates) and is part of ``failed``,
    the text whose encoding failed, with its option.

    A file name may be any bytes, but a name, id or JSON sent to the service, or a value stored in the database,
    must be UTF-8 text: encoding it fails deep in httpx or SQLite, so the error names the argument instead."""
    for i, arg in enumerate(args):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as exc:
            if arg[exc.start:exc.end] not in failed:
                continue
            option, _, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
            if not option and i > 0 and args[i - 1].startswith("-"):
                option = args[i - 1]
            shown = repr(os.fsencode(value)[:80])[1:]  # the bytes as given: b'\xff...' less its b
            return f"{option} {shown}" if option else shown
    return None


_ANSWERS: list[str] = []  # "METHOD URL" of each successful answer the running command read from a server


def note_answer(where: str) -> None:
    """Called by the REST client for every 2xx answer: a shape error after one is the server's, not the user's."""
    _ANSWERS.append(where)


def _unexpected_answer(exc: Exception) -> str:
    """Why: a server answering with JSON of another shape (a proxy, another version, a foreign service: ``[]`` where
    an object was expected, ``"value": 5`` where a list) made the verbs' ``answer["x"].get(...)`` a traceback."""
    detail = _one_line(f"{type(exc).__name__}: {exc}")
    return (f"{_ANSWERS[-1]} answered with JSON this opendps cannot read ({detail[:200]}): is it an opendps server of "
            "this version?")


class _OneLineErrors(click.Group):
    """Every failure, usage errors included, is one ``error: ...`` line on stderr and a non-zero exit.

    Scripts and the tests read stderr; click's default multi-line usage banner hides the cause.
    """

    def main(self, args: Sequence[str] | None = None, *rest: Any, standalone_mode: bool = True,
             **kwargs: Any) -> Any:
        _ANSWERS.clear()
        try:
            rv = super().main(args, *rest, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except OpenDPSError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(1)
        except ConfigurationError as exc:  # e.g. a worker that could not listen: the operator's to fix
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(1)
        except OSError as exc:  # a path no verb could use (too long, not permitted, a directory): the file and why
            name = str(exc.filename) if exc.filename is not None else ""
            where = f"{name[:200]}{'...' if len(name) > 200 else ''}: " if name else ""
            click.echo(f"error: {where}{exc.strerror or _one_line(str(exc))}", err=True)
            sys.exit(1)
        except UnicodeEncodeError as exc:
            bad = _not_utf8(sys.argv[1:] if args is None else list(args), str(exc.object))
            if bad is None:  # not the command line's fault: a bug to see in full
                raise
            click.echo(f"error: {bad} is not valid UTF-8 text", err=True)
            sys.exit(1)
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            if not _ANSWERS:  # nothing was read from a server: a bug to see in full
                raise
            click.echo(f"error: {_unexpected_answer(exc)}", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="opendps")
def main() -> None:
    """opendps: self-hosted IoT Device Provisioning Service with a managed X.509 PKI."""


@main.command()
@server_options
def init(data_dir: Path | None, db: str | None, host: str | None, hostname: str | None, https_port: int | None,
         mqtt_port: int | None, amqp_port: int | None, http_port: int | None, client_timeout: float | None,
         sqlite_synchronous: str | None, sqlite_busy_timeout: float | None, no_lint: bool, workers: int | None,
         bus: str | None,
         key_backend: str | None, pkcs11_module: str | None, pkcs11_token_label: str | None,
         pkcs11_pin_file: str | None) -> None:
    """Initialise the data directory (database, master key, TLS, ID scope, owner credentials); on an existing one,
    change what was given (e.g. --key-backend pkcs11: new CA keys on an HSM token from now on)."""
    settings = _settings(data_dir, db=db, host=host, hostname=hostname, https_port=https_port,
                         mqtt_port=mqtt_port, amqp_port=amqp_port, http_port=http_port, client_timeout=client_timeout,
                         sqlite_synchronous=sqlite_synchronous, sqlite_busy_timeout=sqlite_busy_timeout,
                         lint=False if no_lint else None, workers=workers,
                         bus=bus, key_backend=key_backend,
                         pkcs11_module=pkcs11_module, pkcs11_token_label=pkcs11_token_label,
                         pkcs11_pin_file=pkcs11_pin_file)
    existed = settings.config_path.exists()
    inst = _open(settings)
    click.echo(f"{'already initialised' if existed else 'initialised'} {settings.data_dir.resolve()}")
    click.echo(f"ID scope: {inst.id_scope}")
    click.echo(f"trust this server CA: {inst.server_ca_path.resolve()}")
    custody = inst.key_custody()
    pkcs11 = custody["pkcs11"]
    if custody["defaultKeyBackend"] == "pkcs11" and isinstance(pkcs11, dict):
        click.echo(f"new CA keys: on PKCS#11 token {pkcs11['tokenLabel']!r} ({pkcs11['module']}); "
                   "serve needs its PIN (OPENDPS_PKCS11_PIN or --pkcs11-pin-file)")
    click.echo("owner connection string: opendps dps connection-string show  (a secret: it is never printed unasked)")
    inst.close()


def observability_options(f: _F) -> _F:
    """``serve`` only: where Prometheus scrapes besides HTTPS ``/metrics``, and the log format (opendps.logs)."""
    f = click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                     help="Plain-HTTP port serving GET /metrics only, for Prometheus (default 0 = off; HTTPS "
                          "/metrics answers loopback clients without credentials, others with a ServiceConfig SAS).")(f)
    f = click.option("--metrics-host", default=None,
                     help="Bind address of --metrics-port (default 127.0.0.1: open it to a network on purpose).")(f)
    f = click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
                     help="Log lines as text (the default) or one JSON object per line, with stable field names.")(f)
    return f


@main.command()
@server_options
@observability_options
def serve(data_dir: Path | None, db: str | None, host: str | None, hostname: str | None, https_port: int | None,
          mqtt_port: int | None, amqp_port: int | None, http_port: int | None, client_timeout: float | None,
          sqlite_synchronous: str | None, sqlite_busy_timeout: float | None, no_lint: bool, workers: int | None,
         bus: str | None,
          key_backend: str | None, pkcs11_module: str | None, pkcs11_token_label: str | None,
          pkcs11_pin_file: str | None, metrics_port: int | None,
          metrics_host: str | None, log_format: str | None) -> None:
    """Start the server (initialising the data directory on first run); with several workers, this process
    supervises them."""
    from opendps.server import limit_malloc_arenas, run

    limit_malloc_arenas()
    settings = _settings(data_dir, db=db, host=host, hostname=hostname, https_port=https_port,
                         mqtt_port=mqtt_port, amqp_port=amqp_port, http_port=http_port, client_timeout=client_timeout,
                         sqlite_synchronous=sqlite_synchronous, sqlite_busy_timeout=sqlite_busy_timeout,
                         lint=False if no_lint else None, workers=workers,
                         bus=bus, key_backend=key_backend,
                         pkcs11_module=pkcs11_module, pkcs11_token_label=pkcs11_token_label,
                         pkcs11_pin_file=pkcs11_pin_file, metrics_port=metrics_port, metrics_host=metrics_host,
                         log_format=log_format)
    inst = _open(settings, persist=False)  # config.json is written once the listeners are up, not before
    # the metrics listener has its own bind address: named, or a bad --metrics-host was blamed on --host
    metrics = f", metrics port {settings.metrics_port} on {settings.metrics_host}" if settings.metrics_port else ""
    try:
        run(inst)
    except OSError as exc:
        raise CliError(f"cannot listen on {settings.host} (HTTPS port {settings.https_port}, MQTT port "
                       f"{settings.mqtt_port}, AMQP port {settings.amqp_port}, HTTP port {settings.http_port}"
                       f"{metrics}): {exc.strerror or exc}") from exc
    finally:
        inst.close()


@main.command()
@data_dir_option
@click.option("--show-secrets", is_flag=True, default=False,
              help="Also print the owner connection strings of the service and its hubs (their keys own them).")
@OUTPUT_OPTION
def info(data_dir: Path | None, show_secrets: bool, output: str) -> None:
    """Endpoints, ID scope, server CA path, nodes; the owner connection strings with --show-secrets (for scripts:
    -o json)."""
    settings = _settings(data_dir)
    inst = _open(settings, create=False)
    data = inst.info(secrets=show_secrets)
    inst.close()
    if output != "table":
        from opendps.cli.output import emit

        emit(data, output)
    else:
        from opendps.cli.output import print_table

        flat = {"idScope": data["idScope"], "https": data["endpoints"]["https"]["url"],
                "mqtt": f'{data["endpoints"]["mqtt"]["hostName"]}:{data["endpoints"]["mqtt"]["port"]}',
                "amqp": (f'{data["endpoints"]["amqp"]["hostName"]}:{data["endpoints"]["amqp"]["port"]}'
                         if data["endpoints"]["amqp"]["port"] else "off"),
                "http": (f'{data["endpoints"]["http"]["hostName"]}:{data["endpoints"]["http"]["port"]}'
                         if data["endpoints"]["http"]["port"] else "off"),
                "serverCaCertificate": data["serverCaCertificate"], "database": data["database"],
                "dataDir": data["dataDir"]}
        print_table([flat])
        nodes = data["nodes"]
        if nodes:
            click.echo(f"{len(nodes)} server process(es) running:")
            print_table([{"host": n["host"], "worker": n["worker"], "pid": n["pid"], "startedAt": n["startedAt"],
                          "heartbeatAt": n["heartbeatAt"], "id": n["id"]} for n in nodes])
        else:
            click.echo("no server process is running")


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@data_dir_option
@click.option("--db", "db_url", default=None, help="Database URL (default from the data directory / $OPENDPS_DB).")
def db_upgrade(data_dir: Path | None, db_url: str | None) -> None:
    """Apply database migrations."""
    from opendps.instance import check_db_url, one_line
    from opendps.store import Store

    settings = _settings(data_dir, db=db_url)
    try:
        # as init and serve check it: one line, not SQLAlchemy's traceback; --db '' too (db_url would fall back to
        # the data directory's SQLite file and migrate that instead)
        check_db_url(settings.db_url if db_url is None else db_url)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    if settings.db is None and not settings.data_dir.is_dir():  # its SQLite file: "unable to open database file" said
        raise CliError(f"data directory {settings.data_dir} does not exist: run 'opendps init' first, or give --db")
    store = Store(settings.db_url)
    try:
        store.upgrade()
        click.echo(f"database at revision {store.current_revision()}")
    except Exception as exc:  # re-raised as one line: alembic and the drivers raise many kinds
        raise CliError(f"migration failed: {one_line(exc)}") from exc
    finally:
        store.dispose()


try:
    from opendps.cli.management import register as _register_management
except ImportError:  # pragma: no cover - during bootstrap of the package only
    _register_management = None
if _register_management is not None:
    _register_management(main)
    from opendps.cli.quickstart import register as _register_quickstart

    _register_quickstart(main)
    from opendps.cli.bench import register as _register_bench

    _register_bench(main)
    from opendps.cli.audit import register as _register_audit

    _register_audit(main)
    from opendps.cli.status import register as _register_status

    _register_status(main)


def run() -> None:
    main()
