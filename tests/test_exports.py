"""Every package lists exactly its public names in ``__all__``."""

from __future__ import annotations

import importlib
import inspect

import pytest

import plings_hsm.errors

PACKAGES = [
    "plings_hsm",
    "plings_hsm.backends",
    "plings_hsm.cli",
    "plings_hsm.core",
    "plings_hsm.identifier",
    "plings_hsm.manager",
    "plings_hsm.service",
    "plings_hsm.store",
]


class TestPackageExports:
    """A package's ``__all__`` equals the public names it defines or re-exports."""

    @pytest.mark.parametrize("name", PACKAGES)
    def test_all_matches_public_names(self, name: str) -> None:
        package = importlib.import_module(name)
        public = {
            attribute
            for attribute, value in vars(package).items()
            if not attribute.startswith("_")
            and not inspect.ismodule(value)
            and attribute != "annotations"
        }
        assert set(package.__all__) - {"__version__"} == public

    @pytest.mark.parametrize("name", PACKAGES)
    def test_all_has_no_duplicates(self, name: str) -> None:
        package = importlib.import_module(name)
        assert len(package.__all__) == len(set(package.__all__))


class TestErrorExports:
    """errors.py exports every error class and draws each in its docstring tree."""

    def test_every_error_exported(self) -> None:
        classes = {
            name
            for name, value in vars(plings_hsm.errors).items()
            if inspect.isclass(value) and issubclass(value, Exception)
        }
        assert classes == set(plings_hsm.errors.__all__)

    def test_every_error_in_tree(self) -> None:
        doc = plings_hsm.errors.__doc__ or ""
        missing = [name for name in plings_hsm.errors.__all__ if name not in doc]
        assert missing == []
