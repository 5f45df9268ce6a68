"""``opendps quickstart``: the seed end to end through the installed entry point (issue 5)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import free_ports

STEPS = ["namespace and policy", "bootstrap CA chain", "proof of possession", "enrollment group",
         "symmetric-key enrollment", "provision and connect quickstart-x509", "provision and connect quickstart-symkey",
         "telemetry", "twin reporting", "forced renewal"]


def quickstart(tmp_path, *extra: str) -> tuple[int, dict]:
    ports = free_ports(3)
    proc = subprocess.run([sys.executable, "-m", "opendps", "quickstart", "--data-dir", str(tmp_path / "data"),
                           "--https-port", str(ports[0]), "--mqtt-port", str(ports[1]),
                           "--amqp-port", str(ports[2]), "-o", "json", *extra],
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(proc.stdout)


def test_quickstart_runs_the_seed_and_can_run_again(tmp_path):
    code, report = quickstart(tmp_path)
    assert code == 0 and report["ok"] is True, report
    assert [s["name"] for s in report["steps"]] == STEPS
    assert all(s["ok"] for s in report["steps"])
    renewal = report["steps"][-1]["detail"]
    before, after = renewal.split("serial ")[1].split(",")[0].split(" -> ")
    assert before != after
    keys = sorted((tmp_path / "data" / "quickstart").rglob("*.key"))
    assert keys and all(k.stat().st_mode & 0o077 == 0 for k in keys)
    code, again = quickstart(tmp_path)  # the files, enrollments and devices are reused
    assert code == 0 and again["ok"] is True, again
    code, other = quickstart(tmp_path, "--prefix", "qs2")  # issue 12.16: another prefix after a default run
    assert code == 0 and other["ok"] is True, other


def test_quickstart_exits_non_zero_when_a_step_fails(tmp_path):
    code, report = quickstart(tmp_path, "--prefix", "not a valid id!")
    assert code == 1 and report["ok"] is False
    failed = [s for s in report["steps"] if not s["ok"]]
    assert len(failed) == 1 and report["steps"][-1] is not None and failed[0] == report["steps"][-1]
    assert not failed[0]["detail"].startswith(("CliError", "ApiError")), failed[0]  # the message, not a class name
