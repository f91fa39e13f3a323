"""compat.py: the private internals it reaches are checked against the library versions it was written for."""

import pytest

import compat


def test_other_library_versions_are_refused_with_what_to_check(monkeypatch):
    compat._check_lightning(), compat._check_ffcv()  # the installed ones pass
    monkeypatch.setattr(compat, "version", lambda name: "2.9.1")
    with pytest.raises(RuntimeError, match=r"lightning 2.9.1 is installed.*widen LIGHTNING_VERSIONS"):
        compat._check_lightning()
    monkeypatch.setattr(compat, "version", lambda name: "1.1.0")
    with pytest.raises(RuntimeError, match=r"ffcv 1.1.0 is installed.*Install ffcv==1.0.2"):
        compat._check_ffcv()
