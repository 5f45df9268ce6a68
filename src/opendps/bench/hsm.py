"""``hsm-issue``: leaf issuance with the issuing CA's key on a PKCS#11 token (SoftHSM2) vs in software, in one run.

In the bench process, no server: one SQLite store in a temporary directory, a SoftHSM2 token made for the run
(``softhsm2-util``, its own SOFTHSM2_CONF), and for each backend a namespace whose root and issuing CA keys are
made there. The clock covers what a registration pays for its certificate — :meth:`IssuanceEngine.issue` (profile,
lint-once-per-shape, the signature through the :class:`Signer`, the row) — from 1 and from 4 threads (the server's
domain pool; a process's PKCS#11 calls take turns on its one session). CPU is the bench process's, so SoftHSM2's
signing (a library in this process) is in it; a network HSM would move that CPU to the HSM and add a round trip.
``extra`` has the signature alone (``Signer.sign``, mean ms) and the pkcs11 rows say their cost ÷ software's.
SoftHSM2 missing: no rows, one line on stderr (apt-get install softhsm2; pip install 'opendps[hsm]').
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from opendps.bench._harness import BenchError, Options, Result, latency_summary, proc_peak_rss

if TYPE_CHECKING:
    from opendps.pki import IssuanceEngine, Issuer

QUICK_COUNT, FULL_COUNT = 100, 1000
THREADS = (1, 4)
SOFTHSM_MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                   "/usr/local/lib/softhsm/libsofthsm2.so")
TOKEN, PIN = "opendps-bench", "bench-pin"


def _softhsm(directory: Path) -> str | None:
    """Make a SoftHSM2 configuration and token under ``directory`` (SOFTHSM2_CONF set for this process); the
    module path, or None when SoftHSM2 or python-pkcs11 is missing."""
    module = next((m for m in SOFTHSM_MODULES if os.path.exists(m)), None)
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return None
    if module is None or shutil.which("softhsm2-util") is None:
        return None
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    made = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin",
                           secrets.token_hex(8)], capture_output=True, text=True)
    if made.returncode != 0:
        raise BenchError(f"softhsm2-util --init-token failed: {made.stderr.strip()}")
    return module


def hsm_issue(opts: Options) -> list[Result]:
    n = opts.count or (QUICK_COUNT if opts.quick else FULL_COUNT)
    saved_conf = os.environ.get("SOFTHSM2_CONF")
    try:
        return _run(n, opts)
    finally:
        if saved_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved_conf


def _run(n: int, opts: Options) -> list[Result]:
    import base64

    from opendps.device.keys import new_key_and_csr
    from opendps.pki import KeyStore
    from opendps.pki.pkcs11 import Pkcs11Config, Pkcs11Token
    from opendps.services import wire
    from opendps.store import Store, sqlite_url

    with tempfile.TemporaryDirectory(prefix="opendps-bench-hsm-") as tmp:
        module = _softhsm(Path(tmp))
        if module is None:
            print("hsm-issue: skipped, SoftHSM2 or python-pkcs11 is missing (apt-get install softhsm2; "
                  "pip install 'opendps[hsm]')", file=sys.stderr)
            return []
        token = Pkcs11Token(Pkcs11Config(module, TOKEN, PIN))
        token.open()
        store = Store(sqlite_url(Path(tmp) / "bench.db"))
        store.upgrade()
        master = secrets.token_bytes(32)
        csrs = [base64.b64decode(new_key_and_csr(f"hsm-bench-{i}", "P-384")[1]) for i in range(n * len(THREADS))]
        rows: list[Result] = []
        try:
            for backend in ("software", "pkcs11"):
                keys = KeyStore(store, master, token=token, default_backend=backend)
                services = wire(store, keys, id_scope="0neBENCHHSM", lint=opts.lint)
                services.registry.create_namespace(f"bench-{backend}")
                issuer = services.registry.issuer(services.registry.get_policy(f"bench-{backend}", "default").policy_id)
                for i in range(3):  # the shape's lint, the signer found and cached, the first signature verified
                    services.issuance.issue(issuer, base64.b64decode(new_key_and_csr(f"warm-{i}", "P-384")[1]),
                                            f"warm-{i}")
                signer = keys.signer(issuer.key_id)
                t0 = time.perf_counter()
                for i in range(100):
                    signer.sign(b"bench %d" % i)
                sign_ms = (time.perf_counter() - t0) * 10  # mean ms of 100
                for k, threads in enumerate(THREADS):
                    batch = list(enumerate(csrs))[k * n:(k + 1) * n]
                    rows.append(_timed(services.issuance, issuer, batch, backend, threads, sign_ms))
        finally:
            token.close()
            store.dispose()
    software = {r.concurrency: r.cpu_seconds_per_op for r in rows if r.transport == "software"}
    for r in rows:
        if r.transport == "pkcs11" and software.get(r.concurrency):
            r.ratios["software"] = round(software[r.concurrency] / r.cpu_seconds_per_op, 4)
    return rows


def _timed(issuance: IssuanceEngine, issuer: Issuer, csrs: list[tuple[int, bytes]], backend: str, threads: int,
           sign_ms: float) -> Result:
    latencies: list[float] = []

    def one(item: tuple[int, bytes]) -> None:
        i, der = item
        started = time.perf_counter()
        issuance.issue(issuer, der, f"hsm-bench-{i}")  # the CSR's CN
        latencies.append(time.perf_counter() - started)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, csrs))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    per_op = cpu / len(csrs)
    return Result(scenario="hsm-issue", transport=backend, concurrency=threads, count=len(csrs), ok=len(csrs), errors=0,
                  wall_seconds=round(wall, 3), throughput=round(len(csrs) / wall, 2), latency=latency_summary(latencies),
                  server_cpu_seconds=None, cpu_seconds_per_op=round(per_op, 6), peak_rss_bytes=proc_peak_rss(os.getpid()),
                  ops_per_cpu_second=round(1 / per_op, 1) if per_op else 0.0, system="opendps",
                  extra={"sign_ms": round(sign_ms, 3), "key_backend": backend})
