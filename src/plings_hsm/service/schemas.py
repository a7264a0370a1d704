"""Request and response bodies of the HSM service, in the wire names clients use."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from plings_hsm.core.path import INDEX_MAX

__all__ = [
    "DeriveKeysRequest",
    "DeriveKeysResponse",
    "ErrorBody",
    "ErrorResponse",
    "HealthResponse",
    "KeyItem",
    "SignRequest",
    "SignResponse",
    "WalletItem",
]

Index = Annotated[StrictInt, Field(ge=0, le=INDEX_MAX)]


def _reject_null(value: object) -> object:
    # Runs only for a value the client sent; an absent field keeps its default.
    if value is None:
        raise ValueError("null is not allowed; leave the field out to use the default")
    return value


class DeriveKeysRequest(BaseModel):
    """A batch to derive: the shared levels, the first instance and how many."""

    # An unknown field is rejected: a misspelt "walletversion" was once ignored, and
    # the default wallet's keys were served.
    model_config = ConfigDict(extra="forbid")

    manufacturer: Index
    category: Index
    classId: Index  # noqa: N815 - wire name
    batch: Index
    quantity: Annotated[StrictInt, Field(ge=1, le=INDEX_MAX)]
    walletVersion: Index | None = None  # noqa: N815 - wire name
    startInstance: Index = 1  # noqa: N815 - wire name

    _wallet_not_null = field_validator("walletVersion", mode="before")(_reject_null)


class KeyItem(BaseModel):
    """One derived key in the wire shape."""

    instanceNumber: int  # noqa: N815 - wire name
    hdPath: str  # noqa: N815 - wire name
    publicKey: str  # noqa: N815 - wire name
    humanReadablePath: str  # noqa: N815 - wire name


class DeriveKeysResponse(BaseModel):
    """A derived batch."""

    success: Literal[True] = True
    count: int
    keys: list[KeyItem]


class SignRequest(BaseModel):
    """A message to sign with the key of one instance; ``message`` is base64 text."""

    model_config = ConfigDict(extra="forbid")

    manufacturer: Index
    category: Index
    classId: Index  # noqa: N815 - wire name
    batch: Index
    instanceNumber: Index  # noqa: N815 - wire name
    walletVersion: Index | None = None  # noqa: N815 - wire name
    message: StrictStr = Field(description="The bytes to sign, base64 (RFC 4648, padded).")

    _wallet_not_null = field_validator("walletVersion", mode="before")(_reject_null)


class SignResponse(BaseModel):
    """An Ed25519 signature (RFC 8032) and the public key that verifies it."""

    success: Literal[True] = True
    publicKey: str = Field(description="base58, as in derive responses")  # noqa: N815 - wire name
    signature: str = Field(description="64 bytes, base64")


class WalletItem(BaseModel):
    """Public facts about one wallet."""

    walletVersion: int  # noqa: N815 - wire name
    label: str
    scheme: str
    fingerprint: str


class HealthResponse(BaseModel):
    """Service health; contains no secret."""

    status: Literal["ok", "unavailable"]
    backend: str
    tokenReachable: bool  # noqa: N815 - wire name
    wallets: list[WalletItem]
    version: str


class ErrorBody(BaseModel):
    """Error detail: a stable code, a sentence, and the field when one is at fault."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Body of every error response."""

    success: Literal[False] = False
    error: ErrorBody
    requestId: str  # noqa: N815 - wire name
