"""The fleet dashboard's aggregates (issue 19): management routes under ``/fleet/`` (ServiceConfig).

Each answer is a page or a server-side aggregate computed in SQL by the package that owns the rows, so the
dashboard works on a store of any size without loading it: devices a page at a time by id (keyset), the certificate
expiry timeline one ``GROUP BY`` in pki, registrations per minute one ``GROUP BY`` in provisioning.
"""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
