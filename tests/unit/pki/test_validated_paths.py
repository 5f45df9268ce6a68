"""Remembered path validations (pki.certificates.ValidatedPaths): only inside the path's validity, bounded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.x509_helpers import make_ca, make_leaf

from opendps.pki.certificates import ValidatedPaths


def test_a_validated_path_is_remembered_only_inside_its_validity_and_within_bounds():
    ca = make_ca("paths ca")
    leaf, _ = make_leaf("dev-window", ca, not_after=timedelta(days=2))
    paths = ValidatedPaths(capacity=2)
    path = (leaf, ca.cert)
    key = paths.key(path)
    assert key == ValidatedPaths.key((leaf, ca.cert)) and key != paths.key((ca.cert, leaf))
    paths.add(key, path, "anchor")
    now = datetime.now(UTC)
    assert paths.get(key, now) == "anchor"
    assert paths.get(key, leaf.not_valid_before_utc - timedelta(seconds=1)) is None  # a clock set back: forgotten
    assert paths.get(key, now) is None
    paths.add(key, path, "anchor")
    assert paths.get(key, leaf.not_valid_after_utc + timedelta(seconds=1)) is None and len(paths) == 0
    others = [paths.key((make_leaf(f"dev-{i}", ca)[0], ca.cert)) for i in range(3)]
    for other in others:
        paths.add(other, path)
    assert len(paths) == 2 and paths.get(others[0], now) is None and paths.get(others[2], now) is True
