"""SoftHSM2 for the PKCS#11 tests: a token directory and SOFTHSM2_CONF of their own, tokens made with softhsm2-util,
inspected with OpenSC's pkcs11-tool.

SoftHSM reads SOFTHSM2_CONF when a process initialises the module, and python-pkcs11 initialises it once per
process: so the test process has one SoftHSM configuration for the whole session (:func:`session_softhsm`), made
before the module is first loaded, with every token the in-process tests use. A server subprocess gets the same
environment. Without softhsm2, pkcs11-tool or python-pkcs11 the tests skip locally and fail in CI
(``service_missing``); .ci/run installs softhsm2 and opensc.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.conftest import service_missing

from opendps.pki.pkcs11 import Pkcs11Config

MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/local/lib/softhsm/libsofthsm2.so")
PIN = "4711-user"
SO_PIN = "0815-so"
TOKEN = "opendps-test"  # the in-process tests' token
SPARE_TOKEN = "opendps-spare"  # a second token, for tests that need one the others do not touch
E2E_TOKEN = "opendps-e2e"  # the end-to-end server's (tests/test_hsm_e2e.py)


def module_path() -> str | None:
    return next((p for p in MODULE_CANDIDATES if os.path.exists(p)), None)


def require_softhsm() -> str:
    """The SoftHSM2 module path, or skip (fail in CI) with what is missing."""
    try:
        import pkcs11  # noqa: F401
    except ImportError as exc:
        service_missing(f"python-pkcs11 not installed (pip install 'opendps[hsm]'): {exc}")
    module = module_path()
    if module is None or shutil.which("softhsm2-util") is None:
        service_missing("SoftHSM2 not installed (apt-get install softhsm2)")
    if shutil.which("pkcs11-tool") is None:
        service_missing("pkcs11-tool not installed (apt-get install opensc)")
    assert module is not None
    return module


@dataclass
class SoftHsm:
    directory: Path
    module: str
    labels: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def config(self, label: str = TOKEN, pin: str = PIN) -> Pkcs11Config:
        return Pkcs11Config(self.module, label, pin)

    def init_token(self, label: str) -> None:
        run = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN,
                              "--so-pin", SO_PIN], env={**os.environ, **self.env}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        self.labels.append(label)

    def tool(self, *args: str, label: str = TOKEN, login: bool = True, check: bool = True) -> str:
        """pkcs11-tool on ``label``'s token (logged in with the user PIN unless ``login`` is false): its stdout."""
        cmd = ["pkcs11-tool", "--module", self.module, "--token-label", label]
        if login:
            cmd += ["--login", "--pin", PIN]
        run = subprocess.run([*cmd, *args], env={**os.environ, **self.env}, capture_output=True, text=True)
        if check:
            assert run.returncode == 0, f"pkcs11-tool {' '.join(args)}: {run.stderr}"
        return run.stdout

    def objects(self, label: str = TOKEN, *, login: bool = True) -> list[dict[str, str]]:
        """``pkcs11-tool --list-objects``, parsed: one dict per object (``kind``: its header line, then its fields)."""
        return parse_objects(self.tool("--list-objects", label=label, login=login))


def make_softhsm(directory: Path, *labels: str) -> SoftHsm:
    """A SoftHSM2 configuration and token directory under ``directory``, with a token for each of ``labels``."""
    module = require_softhsm()
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    hsm = SoftHsm(directory, module)
    hsm.conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
                        "slots.removable = false\n")
    for label in labels:
        hsm.init_token(label)
    return hsm


_HEADER = re.compile(r"^(Private Key|Public Key|Certificate|Data|Secret Key|Profile) Object")


def parse_objects(text: str) -> list[dict[str, str]]:
    objects: list[dict[str, str]] = []
    for line in text.splitlines():
        if _HEADER.match(line):
            objects.append({"kind": line.strip()})
        elif objects and ":" in line and line.startswith(" "):
            name, _, value = line.strip().partition(":")
            objects[-1][name.strip()] = value.strip()
    return objects


_SESSION: list[SoftHsm] = []  # one per test process, whichever module asks first


@pytest.fixture(scope="session")
def session_softhsm(tmp_path_factory) -> SoftHsm:
    """The test process's SoftHSM2 (tokens ``TOKEN``, ``SPARE_TOKEN`` and ``E2E_TOKEN``), SOFTHSM2_CONF set for the
    rest of the session (a server subprocess inherits it). Modules import this fixture, and pytest makes one per
    importing module even at session scope: they share the one made first, since the module reads its
    configuration once per process."""
    require_softhsm()
    if not _SESSION:
        hsm = make_softhsm(tmp_path_factory.mktemp("softhsm"), TOKEN, SPARE_TOKEN, E2E_TOKEN)
        os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
        _SESSION.append(hsm)
    return _SESSION[0]
