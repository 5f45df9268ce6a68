"""A software TPM 2.0 (swtpm) on loopback for the TPM tests.

:func:`running_swtpm` starts ``swtpm socket --tpm2`` with a fresh state directory on two consecutive free
loopback ports (the server port P and the control port P+1, which is where the ``swtpm`` TCTI looks for
it) and yields the TCTI string ``swtpm:host=127.0.0.1,port=P`` (for tpm2-tools' ``-T``/``TPM2TOOLS_TCTI``
and tpm2-pytss' ``TCTILdr``). The TPM is started (``startup-clear``): no ``tpm2_startup`` needed.

When swtpm or tpm2-tools are missing it skips through :func:`tests.conftest.service_missing` (a failure
where OPENDPS_REQUIRE_SERVICES=1, as in CI). The session-scoped ``swtpm`` fixture in tests/conftest.py
wraps it; tests sharing that TPM should flush what they load (``tpm2_flushcontext -t``): a TPM has
only three transient object slots.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOOLS = ("swtpm", "tpm2_createprimary")


def tools_missing() -> str | None:
    """Why the software TPM cannot run here, or None."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install swtpm swtpm-tools tpm2-tools)"
    return None


def _consecutive_free_ports() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (held together while chosen)."""
    for _ in range(200):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        second = socket.socket()
        try:
            second.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        finally:
            first.close()
            second.close()
        return port
    raise RuntimeError("no two consecutive free loopback ports")


def _wait_ready(port: int, proc: subprocess.Popen, deadline: float) -> bool:
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
            with socket.create_connection(("127.0.0.1", port + 1), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@contextmanager
def running_swtpm(state_dir: Path | None = None) -> Iterator[str]:
    """Run a fresh swtpm; yield its TCTI string; stop it (and remove its state unless given) on exit."""
    reason = tools_missing()
    if reason:
        from tests.conftest import service_missing

        service_missing(reason)
    own_dir = state_dir is None
    directory = Path(tempfile.mkdtemp(prefix="swtpm-")) if state_dir is None else state_dir
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "swtpm.log"
    proc: subprocess.Popen | None = None
    try:
        for _attempt in range(5):  # a port taken between choosing it and swtpm binding it: try others
            port = _consecutive_free_ports()
            proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", f"type=tcp,bindaddr=127.0.0.1,port={port}",
                 "--ctrl", f"type=tcp,bindaddr=127.0.0.1,port={port + 1}",
                 "--tpmstate", f"dir={directory}",
                 "--flags", "startup-clear,not-need-init",
                 "--log", f"file={log_path},level=1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            if _wait_ready(port, proc, time.time() + 15):
                break
            _stop(proc)
            proc = None
        if proc is None:
            import pytest

            log = log_path.read_text() if log_path.exists() else ""
            pytest.fail(f"swtpm did not start: {log}")
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        if proc is not None:
            _stop(proc)
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def tpm2(tcti: str, tool: str, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one tpm2-tools command against ``tcti``; on failure fail the test with its stderr."""
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    proc = subprocess.run([f"tpm2_{tool}", *args], cwd=cwd, env=env, capture_output=True, timeout=60)
    if check and proc.returncode != 0:
        import pytest

        pytest.fail(f"tpm2_{tool} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc
