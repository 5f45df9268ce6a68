"""Fixtures and helpers of the compat suite (issue 6): Microsoft's Azure IoT Python SDKs against ``opendps serve``.

azure-iot-device 2.14.0 pins paho-mqtt < 2 and azure-iot-hub needs uamqp, so the SDKs live in their own
virtualenv (``tests/compat/.venv-azure``, created from PyPI once and reused) and run in subprocesses
(``azure_sdk_driver.py``) that print JSON. The server listens where the SDK insists: MQTT on 8883, MQTT over
WebSockets on 443 (the HTTPS listener), AMQP (service-side C2D) on 5671. Locally a missing venv or a taken port
skips with the reason; under
OPENDPS_REQUIRE_SERVICES=1 (CI) it fails.

The suite runs its modules on two pytest-xdist workers (pyproject.toml): the modules here take a lock file, so only one
of them at a time holds those fixed ports, and one builds the venv while the other waits for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import RunningServer

HERE = Path(__file__).parent
VENV = HERE / ".venv-azure"
DRIVER = HERE / "azure_sdk_driver.py"
REQUIREMENTS = ["azure-iot-device==2.14.0", "azure-iot-hub==2.7.0", "six"]
LOCKS = Path(tempfile.gettempdir())  # machine-wide, as the ports are


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an advisory lock on ``lock_file`` (made if missing) until the block ends: other test processes wait."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.fixture(scope="session")
def azure_python() -> Path:
    """The compat venv's interpreter; built on first use (a few seconds from PyPI), reused while its stamp matches."""
    from tests.conftest import service_missing  # here: tests/conftest.py imports this module
    stamp, python = VENV / "opendps-requirements.txt", _venv_python(VENV)
    wanted = "\n".join(REQUIREMENTS)
    with _exclusive(LOCKS / "opendps-tests-azure-venv.lock"):
        _build_venv(python, stamp, wanted)
    probe = "import importlib.metadata as m, azure.iot.device, azure.iot.hub; print(m.version('azure-iot-device'))"
    check = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    if check.returncode != 0 or check.stdout.strip() != "2.14.0":
        service_missing(f"the Azure SDK venv at {VENV} is unusable: {check.stdout}{check.stderr[-2000:]}")
    return python


def _build_venv(python: Path, stamp: Path, wanted: str) -> None:
    """Make the compat venv unless its stamp says it holds ``wanted``."""
    from tests.conftest import service_missing
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return
    steps = [[sys.executable, "-m", "venv", "--clear", str(VENV)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS]]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            service_missing(f"cannot build the Azure SDK venv ({' '.join(cmd[:4])}): {exc}")
        if proc.returncode != 0:
            service_missing(f"cannot build the Azure SDK venv ({' '.join(cmd[:4])}): {proc.stderr[-2000:]}")
    stamp.write_text(wanted)


def _bindable(port: int) -> str | None:
    """None when ``port`` can be listened on at 127.0.0.1, else why not."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return f"port {port} cannot be bound: {exc}"
    return None


@dataclass
class CompatServer:
    server: RunningServer
    ca_pem: str
    hub_connection_string: str
    websockets: str | None  # None when MQTT over WebSockets (443) is available, else why not
    amqp: str | None = None  # None when the AMQP listener is on 5671 (where uamqp connects), else why not

    def __getattr__(self, name: str):
        return getattr(self.server, name)

    def require_websockets(self) -> None:
        if self.websockets:
            pytest.skip(f"MQTT over WebSockets needs the HTTPS listener on 443: {self.websockets}")

    def require_amqp(self) -> None:
        if self.amqp:
            from tests.conftest import service_missing
            service_missing(f"IoTHubRegistryManager.send_c2d_message always connects AMQP to 5671: {self.amqp}")


@pytest.fixture(scope="module")
def compat_server(tmp_path_factory) -> CompatServer:
    """``opendps serve --workers 2`` on SQLite with MQTT on 8883 and, when they can be bound, HTTPS on 443 and AMQP on
    5671: the SDKs' connections, and their service calls, land on either worker (issue 15)."""
    with _exclusive(LOCKS / "opendps-tests-azure-ports.lock"):  # the other compat module, on the other worker, waits
        yield from _compat_server(tmp_path_factory)


def _compat_server(tmp_path_factory) -> Iterator[CompatServer]:
    from tests.conftest import _run_server, database, service_missing
    why = _bindable(8883)
    if why:
        service_missing(f"the Azure device SDK always connects MQTT to 8883; {why}")
    ws_why, amqp_why = _bindable(443), _bindable(5671)
    tmp_path = tmp_path_factory.mktemp("compat")
    with database("sqlite", tmp_path) as db_url:
        for running in _run_server(db_url, tmp_path, https_port=None if ws_why else 443, mqtt_port=8883,
                                   amqp_port=None if amqp_why else 5671, extra_args=("--workers", "2")):
            out = running.cli("hub", "connection-string", "show", check=True)
            cs = json.loads(out.stdout)
            cs = cs["connectionString"] if isinstance(cs, dict) else cs
            yield CompatServer(running, running.ca_file.read_text(), cs, ws_why, amqp_why)


@dataclass
class SdkProcess:
    """A running driver subprocess; its JSON lines arrive on a queue."""

    proc: subprocess.Popen
    lines: queue.Queue
    seen: list

    def next(self, event: str | None = None, timeout: float = 60) -> dict:
        """The next line (of kind ``event`` if given; a ``result`` line always returns)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=max(0.05, deadline - time.time()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if event is None or line.get("event") in (event, "result"):
                return line
        self.proc.kill()
        pytest.fail(f"SDK driver: no {event or 'line'} within {timeout} s; saw {self.seen}; "
                    f"stderr: {self.proc.stderr.read()[-3000:] if self.proc.stderr else ''}")

    def result(self, timeout: float = 90) -> dict:
        return self.next("result", timeout)


def start_sdk(python: Path, command: str, args: dict) -> SdkProcess:
    return start_driver([str(python), str(DRIVER), command, json.dumps(args)], _sdk_env(args))


def start_driver(argv: list[str], env: dict) -> SdkProcess:
    """Start a driver (Python's or tests/compat/node/driver.js) whose JSON lines the test reads."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE, env=env)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for raw in proc.stdout:
            raw = raw.strip()
            if raw.startswith("{"):
                lines.put(json.loads(raw))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return SdkProcess(proc, lines, [])


def _sdk_env(args: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    if args.get("ca_file"):
        env["REQUESTS_CA_BUNDLE"] = args["ca_file"]  # azure-iot-hub's msrest uses requests
    return env


def run_sdk(python: Path, command: str, args: dict, timeout: float = 90) -> dict:
    """Run one driver command to completion; its result line."""
    return finish(start_sdk(python, command, args), timeout)


def finish(p: SdkProcess, timeout: float = 90) -> dict:
    """Wait for a started driver's result line and its exit."""
    try:
        result = p.result(timeout)
    finally:
        if p.proc.poll() is None:
            p.proc.wait(timeout=30)
    assert result["event"] == "result", (result, p.seen)
    return result
