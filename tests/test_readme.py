"""The README's worked example, run as written: a user who pastes it gets an assigned device.

The shell blocks under "Worked example" run in one bash (``set -eu -o pipefail``: any failing step fails the
test) in the directory holding the server's default data directory ``./.opendps``, with the installed
``opendps`` command, openssl, curl and python3 — what a reader has.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import _run_server, database

README = Path(__file__).resolve().parents[1] / "README.md"


def worked_example() -> str:
    """The README's shell blocks from the "Worked example" section, in order."""
    text = README.read_text()
    section = text.split("## Worked example", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) >= 2, "the README's worked example lost its shell blocks"
    return "\n".join(blocks)


def test_the_worked_example_onboards_a_device(tmp_path_factory):
    for tool in ("openssl", "curl", "bash"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    home = tmp_path_factory.mktemp("readme")
    with database("sqlite", home) as db_url:
        for running in _run_server(db_url, home, data_dir=home / ".opendps"):
            env = {k: v for k, v in running.env.items() if k != "OPENDPS_DATA_DIR"}  # the default ./.opendps
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
            script = "set -eu -o pipefail\n" + worked_example()
            done = subprocess.run(["bash", "-c", script], cwd=home, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, f"the worked example failed:\n{done.stdout}\n{done.stderr}"
            assert done.stdout.strip().splitlines()[-1] == "assigned"

            answer = json.loads((home / "registration.json").read_text())
            state = answer["registrationState"]
            assert state["registrationId"] == "factory-dev-1"
            leaf, issuing, root = (x509.load_der_x509_certificate(base64.b64decode(c))
                                   for c in state["issuedCertificateChain"])
            operational_key = serialization.load_pem_private_key((home / "op.key").read_bytes(), None)
            assert leaf.public_key() == operational_key.public_key()  # the CSR's key, not one made up by the server
            assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
            assert leaf.public_key().curve.name == "secp384r1"
            leaf.verify_directly_issued_by(issuing)
            issuing.verify_directly_issued_by(root)
            root.verify_directly_issued_by(root)
