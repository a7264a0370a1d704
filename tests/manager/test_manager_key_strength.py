"""Identifier API keys read from the environment are as strong as HSM_API_KEY."""

from __future__ import annotations

import pytest

from plings_hsm.errors import ConfigError
from plings_hsm.manager.config import ManagerSettings

STRONG_KEY = "identifier-strong-key-0123456789abcdef"


class TestIdentifierKeyStrength:
    """Weak client or admin keys are rejected by name, never echoed."""

    @pytest.mark.parametrize("variable", ["PLINGS_IDENTIFIER_API_KEYS", "PLINGS_ADMIN_API_KEY"])
    @pytest.mark.parametrize(
        "weak", ["zqx", "short-weak-key", "with space inside the key 0123456789"]
    )
    def test_weak_key_rejected(self, variable: str, weak: str) -> None:
        with pytest.raises(ConfigError) as caught:
            ManagerSettings.from_env({variable: weak})
        assert variable in str(caught.value)
        assert weak not in str(caught.value)

    def test_strong_keys_accepted(self) -> None:
        settings = ManagerSettings.from_env(
            {
                "PLINGS_IDENTIFIER_API_KEYS": f"{STRONG_KEY}-1, {STRONG_KEY}-2",
                "PLINGS_ADMIN_API_KEY": f"{STRONG_KEY}-admin",
            }
        )
        assert len(settings.identifier_api_keys) == 2
        assert settings.admin_api_key is not None
