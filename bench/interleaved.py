"""Before/after of the registration path on a noisy machine: two servers at once, batches alternated.

    python bench/interleaved.py BEFORE_CHECKOUT AFTER_CHECKOUT [REGISTRATIONS]

Each argument is a source tree (``git worktree add /tmp/before <commit>``), optionally followed by
``:NAME=VALUE,...`` environment settings for that server. Both servers start at once (each a fresh
``opendps serve`` on SQLite with lint on, from its tree's ``src``); batches of 50 registrations (symmetric-key
group, P-384 CSR, a new TLS connection each, 4 in flight, raw HTTPS client) go to one then the other, so
both see the same machine minutes. Prints server CPU per registration for each and the ratio of their means.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

from opendps.bench._harness import Server, running_server
from opendps.bench.provisioning import create_symmetric_group, prepare_devices
from opendps.transport import sas

BATCH, IN_FLIGHT, API = 50, 4, "2025-07-01-preview"


def start(spec: str, stack: contextlib.ExitStack) -> Server:
    root, _, settings = spec.partition(":")
    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = str(Path(root) / "src")
    os.environ.update(kv.split("=", 1) for kv in filter(None, settings.split(",")))
    try:
        return stack.enter_context(running_server(None, True))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def register(server: Server, context: ssl.SSLContext, device: dict[str, Any]) -> None:
    rid = device["rid"]
    conn = http.client.HTTPSConnection("127.0.0.1", server.https_port, context=context)
    token = sas.generate(f"{server.id_scope}/registrations/{rid}", device["symmetric_key"], "registration")
    conn.request("PUT", f"/{server.id_scope}/registrations/{rid}/register?api-version={API}",
                 body=json.dumps({"registrationId": rid, "csr": device["csr"]}).encode(),
                 headers={"Content-Type": "application/json", "Authorization": token})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 202 or json.loads(body).get("status") != "assigned":
        raise SystemExit(f"registration of {rid} failed: {response.status} {body[:200]!r}")


def main(specs: list[str], count: int) -> None:
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        runs = []
        for i, spec in enumerate(specs):
            server = start(spec, stack)
            devices = prepare_devices(create_symmetric_group(server), f"d{i}", count + 20,
                                      Path(tempfile.mkdtemp(prefix="opendps-interleaved-")))
            context = ssl.create_default_context(cafile=str(server.ca_file))
            context.check_hostname = False
            list(pool.map(lambda d, s=server, c=context: register(s, c, d), devices[:20]))  # warm-up
            runs.append((spec, server, context, devices[20:], []))
        for start_at in range(0, count, BATCH):
            for _spec, server, context, devices, costs in runs:
                before = server.cpu_seconds()
                batch = devices[start_at:start_at + BATCH]
                list(pool.map(lambda d, s=server, c=context: register(s, c, d), batch))
                costs.append((server.cpu_seconds() - before) / len(batch) * 1000)
        means = []
        for spec, _server, _context, _devices, costs in runs:
            means.append(sum(costs) / len(costs))
            ordered = sorted(costs)
            print(f"{spec}: {means[-1]:.2f} ms server CPU per registration (median batch {ordered[len(ordered) // 2]:.2f},"
                  f" {len(costs)} batches of {BATCH})")
        print(f"after / before: {means[1] / means[0]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    main(sys.argv[1:3], int(sys.argv[3]) if len(sys.argv) == 4 else 600)
