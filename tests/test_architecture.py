"""The layout's rules, checked on the source: who may import whom, and who may touch which table.

Read from the import statements of every module under src/opendps (function-level imports included),
so a new arrow in the wrong direction fails here, not in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from opendps.store.models import OWNERS

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "opendps"
# the domain, bottom to top: each may import only those before it
DOMAIN = ("opendps.pki", "opendps.registry", "opendps.hub", "opendps.provisioning")
OUTSIDE_THE_DOMAIN = ("opendps.frontends", "opendps.services", "opendps.instance", "opendps.server", "opendps.cli",
                      "opendps.bench", "opendps.cluster", "opendps.workers", "opendps.server_tls")
MODELS = {model.__name__: owner for model, owner in OWNERS.items()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(base, alias.name) for alias in node.names]
            found += [(f"{base}.{alias.name}", None) for alias in node.names]  # `from pkg import module`
    return found


SOURCES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_source_tree_is_read():
    assert len(SOURCES) > 60 and "opendps.provisioning.registration" in SOURCES and "opendps.frontends.http.app" in SOURCES


@pytest.mark.parametrize("layer", DOMAIN)
def test_a_domain_package_imports_no_front_end_and_nothing_above_it(layer):
    above = DOMAIN[DOMAIN.index(layer) + 1:]
    wrong = sorted({f"{module} -> {imported}" for module, imports in SOURCES.items() if _within(module, layer)
                    for imported, _ in imports if imported.startswith("opendps")
                    and any(_within(imported, p) for p in (*above, *OUTSIDE_THE_DOMAIN))})
    assert wrong == []


def test_store_imports_no_other_opendps_package():
    wrong = sorted({f"{module} -> {imported}" for module, imports in SOURCES.items() if _within(module, "opendps.store")
                    for imported, _ in imports if imported.startswith("opendps") and not _within(imported, "opendps.store")})
    assert wrong == []


def test_cluster_imports_only_the_store_and_the_transport():
    """The cluster carries messages between nodes; what they mean is the hub's (``hub.live``). It stores in the store
    and connects through the transport's plumbing (``transport.nats_client``), which means nothing either."""
    wrong = sorted({f"{module} -> {imported}" for module, imports in SOURCES.items()
                    if _within(module, "opendps.cluster") for imported, _ in imports
                    if imported.startswith("opendps") and not _within(imported, "opendps.cluster")
                    and not _within(imported, "opendps.store") and not _within(imported, "opendps.transport")})
    assert wrong == []
    transport = sorted({f"{module} -> {imported}" for module, imports in SOURCES.items()
                        if _within(module, "opendps.transport") for imported, _ in imports
                        if imported.startswith("opendps") and any(_within(imported, p) for p in DOMAIN)})
    assert transport == []  # which holds as long as the transport knows no domain package


def test_audit_imports_only_the_store():
    """Every domain package records into the audit log (``opendps.audit`` is in no layer's way: it is not above any
    of them), so the log may depend on nothing but the store."""
    wrong = sorted({f"{module} -> {imported}" for module, imports in SOURCES.items()
                    if _within(module, "opendps.audit") for imported, _ in imports
                    if imported.startswith("opendps") and not _within(imported, "opendps.audit")
                    and not _within(imported, "opendps.store")})
    assert wrong == []
    assert not any(_within("opendps.audit", p) for p in (*DOMAIN, *OUTSIDE_THE_DOMAIN))
    assert any(imported == "opendps.audit" for module, imports in SOURCES.items() if _within(module, "opendps.pki")
               for imported, _ in imports)  # the domain does use it


def test_only_the_owner_of_a_table_imports_its_model():
    wrong = []
    for module, imports in SOURCES.items():
        if _within(module, "opendps.store"):
            continue
        for imported, name in imports:
            if name in MODELS and imported in ("opendps.store", "opendps.store.models") \
                    and not _within(module, MODELS[name]):
                wrong.append(f"{module} imports {name} (owned by {MODELS[name]})")
    assert wrong == []


def test_every_table_has_an_owner():
    from opendps.store.models import Base

    assert {m.__tablename__ for m in OWNERS} == set(Base.metadata.tables)


def test_front_ends_do_not_import_each_others_routes():
    """HTTP routes, MQTT sessions and AMQP share plumbing modules, never each other's handlers."""
    wrong = sorted({f"{module} -> {imported}" for module, imports in SOURCES.items()
                    for imported, _ in imports
                    for a, b in (("opendps.frontends.amqp", "opendps.frontends.http"),
                                 ("opendps.frontends.mqtt", "opendps.frontends.http"),
                                 ("opendps.frontends.http", "opendps.frontends.amqp"),
                                 ("opendps.frontends.amqp", "opendps.frontends.mqtt"))
                    if _within(module, a) and _within(imported, b)})
    assert wrong == []


def test_http_route_modules_do_not_import_each_other():
    """Route modules share ``wire`` (plumbing) and ``certificates`` (routes for two owners), never each other."""
    routes = ("opendps.frontends.http.service", "opendps.frontends.http.enrollments",
              "opendps.frontends.http.hub_service", "opendps.frontends.http.device", "opendps.frontends.http.audit")
    wrong = sorted({f"{module} -> {imported}" for module in routes for imported, _ in SOURCES[module]
                    if imported in routes and imported != module})
    assert wrong == []


def test_the_checks_see_a_wrong_import(tmp_path):
    """The import reader finds relative, nested and function-level imports (so the rules above can fail)."""
    pkg = tmp_path / "opendps" / "hub"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("from ..frontends import http\ndef f():\n    from opendps.store import Enrollment\n")
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        found = _imports(pkg / "x.py")
    finally:
        SRC = saved
    assert ("opendps.frontends", "http") in found and ("opendps.store", "Enrollment") in found
