"""HTTP front ends. They translate wire <-> domain calls and decide nothing themselves."""

from opendps.api.app import make_app

__all__ = ["make_app"]
