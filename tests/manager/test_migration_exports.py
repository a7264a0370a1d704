"""The manager and identifier packages list only names that exist in ``__all__``."""

from __future__ import annotations

import importlib

import pytest

import plings_hsm.identifier
import plings_hsm.manager

PACKAGES = {
    plings_hsm.manager: [
        "config",
        "gates",
        "key_manager",
        "metrics",
        "migration",
        "notify",
        "rollout",
    ],
    plings_hsm.identifier: ["app"],
}


class TestExports:
    """Each package's and module's ``__all__`` names only attributes that exist."""

    @pytest.mark.parametrize("package", list(PACKAGES), ids=lambda package: package.__name__)
    def test_names_exist(self, package: object) -> None:
        for name in package.__all__:  # type: ignore[attr-defined]
            assert hasattr(package, name), name

    @pytest.mark.parametrize("package", list(PACKAGES), ids=lambda package: package.__name__)
    def test_modules_define_all(self, package: object) -> None:
        for module_name in PACKAGES[package]:  # type: ignore[index]
            module = importlib.import_module(f"{package.__name__}.{module_name}")  # type: ignore[attr-defined]
            for name in module.__all__:
                assert hasattr(module, name), f"{module_name}.{name}"
