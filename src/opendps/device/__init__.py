"""Device SDK: what a device runs to onboard with opendps (or Azure DPS) and talk to its IoT hub.

The flow of the seed (``shared/seed/x509-csr-workflow.txt``): the device authenticates to DPS with a
bootstrap credential (X.509, symmetric key or a group-derived key), sends a CSR for a key it made
itself (:mod:`.keys`), keeps the issued operational chain on disk (:mod:`.store`), connects to the
hub with it (:mod:`.hub`) and renews it before it expires (through the hub's credentials topic or by
registering again).

Modules: :mod:`.keys` (P-384 keys, CSRs, certificate summaries), :mod:`.store` (atomic on-disk
certificate sets with rollback), :mod:`.mqtt` (a small asyncio MQTT 3.1.1 client),
:mod:`.provisioning` (DPS registration over HTTPS or MQTT), :mod:`.hub` (the IoT hub device client)
and :mod:`.sync` (blocking wrappers). The API is asyncio first.

Import rule: this package runs on devices, without the server. It imports only
:mod:`opendps.transport.mqtt.codec`, :mod:`opendps.transport.sas` and third-party libraries
(``cryptography``, ``httpx``) — never ``opendps.frontends``, ``hub``, ``provisioning``, ``store``, ``pki``,
``registry`` or ``instance``. A test imports it with those packages blocked.
"""

from __future__ import annotations
