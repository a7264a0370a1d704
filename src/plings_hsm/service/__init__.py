"""The HSM service: HTTPS API over a key backend."""

from plings_hsm.service.app import create_app
from plings_hsm.service.config import ServiceConfig, service_config_from_env
from plings_hsm.service.server import ServiceServer, tls_config
from plings_hsm.service.tls import TlsFiles, ensure_local_tls

__all__ = [
    "ServiceConfig",
    "ServiceServer",
    "TlsFiles",
    "create_app",
    "ensure_local_tls",
    "service_config_from_env",
    "tls_config",
]
