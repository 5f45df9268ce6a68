"""``opendps quickstart``: the seed end to end through the installed entry point (issue 5)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

from tests.conftest import free_ports, service_missing

from opendps.cli import quickstart as qs

BEFORE_TPM = ["namespace and policy", "bootstrap CA chain", "proof of possession", "enrollment group",
              "symmetric-key enrollment"]
DEVICES = ["provision and connect quickstart-x509", "provision and connect quickstart-symkey"]
AFTER = ["telemetry", "twin reporting", "forced renewal"]
TPM_STEPS = ["software TPM", "TPM enrollment"]
STEPS = BEFORE_TPM + TPM_STEPS + DEVICES + ["provision and connect quickstart-tpm"] + AFTER  # swtpm installed
STEPS_NO_TPM = BEFORE_TPM + ["TPM device"] + DEVICES + AFTER  # skipped, saying why


def quickstart(tmp_path, *extra: str) -> tuple[int, dict]:
    ports = free_ports(4)
    proc = subprocess.run([sys.executable, "-m", "opendps", "quickstart", "--data-dir", str(tmp_path / "data"),
                           "--https-port", str(ports[0]), "--mqtt-port", str(ports[1]),
                           "--amqp-port", str(ports[2]), "--http-port", str(ports[3]), "-o", "json", *extra],
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(proc.stdout)


def test_quickstart_runs_the_seed_and_can_run_again(tmp_path):
    code, report = quickstart(tmp_path)
    assert code == 0 and report["ok"] is True, report
    names = [s["name"] for s in report["steps"]]
    assert names in (STEPS, STEPS_NO_TPM), names
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
    # the TPM device (issue 16.4): checked last, so that without swtpm the rest still ran (skip locally, fail in CI)
    if names == STEPS_NO_TPM:
        skipped = report["steps"][names.index("TPM device")]
        assert skipped["skipped"] is True and skipped["detail"] == qs.tpm_missing(), skipped
        service_missing(f"the quickstart's TPM device: {skipped['detail']}")
    steps = {s["name"]: s for s in report["steps"]}
    assert not any(s["skipped"] for s in report["steps"])
    assert "swtpm" in steps["software TPM"]["detail"]
    tpm = steps["provision and connect quickstart-tpm"]["detail"]
    assert tpm.startswith("quickstart-tpm via HTTPS, TPM (swtpm): hub ") and " valid " in tpm, tpm
    assert steps["twin reporting"]["detail"].startswith("all 3 twins report")
    # every run had its own TPM and re-provisioned through it: a new certificate each time
    serial = [r["steps"][[s["name"] for s in r["steps"]].index("provision and connect quickstart-tpm")]["detail"]
              .split("certificate ")[1].split()[0] for r in (report, again)]
    assert serial[0] != serial[1]
    assert "provision and connect qs2-tpm" in [s["name"] for s in other["steps"]]
    work = tmp_path / "data" / "quickstart"
    assert not list(work.glob("swtpm-*")), "the swtpm state is removed at the end"
    assert (work / "devices" / "quickstart-tpm" / "tpm-hmac.key").stat().st_mode & 0o077 == 0


def test_quickstart_exits_non_zero_when_a_step_fails(tmp_path):
    code, report = quickstart(tmp_path, "--prefix", "not a valid id!")
    assert code == 1 and report["ok"] is False
    failed = [s for s in report["steps"] if not s["ok"]]
    assert len(failed) == 1 and report["steps"][-1] is not None and failed[0] == report["steps"][-1]
    assert not failed[0]["detail"].startswith(("CliError", "ApiError")), failed[0]  # the message, not a class name


def test_quickstart_tpm_device_is_skipped_with_a_reason(tmp_path, monkeypatch, capsys):
    """No swtpm on PATH, or no tpm2-pytss: one line says why, nothing is started, the run stays ok (exit 0)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no swtpm here
    run = qs.Run()
    with contextlib.ExitStack() as stack:
        assert qs.tpm_device(run, None, stack, tmp_path / "work", "qs-tpm", {}) == {}
    assert run.ok and [(s.name, s.ok, s.skipped) for s in run.steps] == [("TPM device", True, True)]
    err = capsys.readouterr().err  # (and tpm2-pytss's reason too where it is not installed)
    assert err.startswith("TPM device skipped: swtpm not installed (apt install swtpm swtpm-tools)") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "work").exists()
    monkeypatch.setitem(sys.modules, "tpm2_pytss", None)  # `import tpm2_pytss` raises ImportError
    assert qs.tpm_missing() == ("swtpm not installed (apt install swtpm swtpm-tools); tpm2-pytss not installed "
                                "(pip install 'opendps[tpm]'; it needs apt install libtss2-dev)")


def test_quickstart_does_not_import_tpm2_pytss():
    """``pip install . && opendps quickstart`` without the TPM extra: the command's module never needs it."""
    code = ("import sys; sys.modules['tpm2_pytss'] = None; import opendps.cli.quickstart, opendps.__main__; "
            "print(opendps.cli.quickstart.tpm_missing())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "tpm2-pytss not installed" in proc.stdout, proc.stderr
