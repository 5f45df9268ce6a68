"""A software TPM 2.0 (swtpm) on loopback: for `opendps quickstart`'s TPM device, the tests, and trying the TPM
flow on a machine without one.

:func:`running_swtpm` starts ``swtpm socket --tpm2`` with a fresh state directory on two consecutive free loopback
ports (the server port P and the control port P+1, where the ``swtpm`` TCTI looks for it) and yields the TCTI string
``swtpm:host=127.0.0.1,port=P`` (tpm2-tools' ``-T``/``TPM2TOOLS_TCTI``, tpm2-pytss' ``TCTILdr``). The TPM is started
(``startup-clear``): no ``tpm2_startup`` needed. It is stopped, and its state removed, on exit.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SwtpmError(RuntimeError):
    """swtpm is missing or did not start."""


def swtpm_missing() -> str | None:
    """Why swtpm cannot run here, or None."""
    if shutil.which("swtpm") is None:
        return "swtpm not installed (apt install swtpm swtpm-tools)"
    return None


def _consecutive_free_ports() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (held together while chosen)."""
    for _ in range(200):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        port = int(first.getsockname()[1])
        second = socket.socket()
        try:
            second.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        finally:
            first.close()
            second.close()
        return port
    raise SwtpmError("no two consecutive free loopback ports for swtpm")


def _ready(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def running_swtpm(parent: Path | None = None) -> Iterator[str]:
    """Run a fresh swtpm, its state in a new directory (under ``parent`` if given); yield its TCTI string."""
    reason = swtpm_missing()
    if reason:
        raise SwtpmError(reason)
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="swtpm-", dir=parent))
    log = state / "swtpm.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        port = 0
        for _attempt in range(5):  # a port taken between choosing it and swtpm binding it: try others
            port = _consecutive_free_ports()
            proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", f"type=tcp,bindaddr=127.0.0.1,port={port}",
                 "--ctrl", f"type=tcp,bindaddr=127.0.0.1,port={port + 1}",
                 "--tpmstate", f"dir={state}", "--flags", "startup-clear,not-need-init",
                 "--log", f"file={log},level=1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            if _ready(port, proc, time.monotonic() + 15):
                break
            _stop(proc)
            proc = None
        if proc is None:
            detail = log.read_text(errors="replace").strip()[-300:] if log.exists() else ""
            raise SwtpmError(f"swtpm did not start{': ' + detail if detail else ''}")
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(state, ignore_errors=True)
