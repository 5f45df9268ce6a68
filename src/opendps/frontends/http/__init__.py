"""The HTTPS front end (aiohttp): routes translate wire <-> domain calls and decide nothing themselves."""

from opendps.frontends.http.app import make_app

__all__ = ["make_app"]
