"""The HSM service: HTTPS API over a key backend."""

from plings_hsm.service.app import ServiceConfig, create_app
from plings_hsm.service.server import ServiceServer, tls_config
from plings_hsm.service.tls import TlsFiles, ensure_local_tls

__all__ = [
    "ServiceConfig",
    "ServiceServer",
    "TlsFiles",
    "create_app",
    "ensure_local_tls",
    "tls_config",
]
