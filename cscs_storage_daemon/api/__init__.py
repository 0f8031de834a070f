"""The read-only HTTP API over the mirrors (spec http-api.md): FastAPI on uvicorn, inside the daemon."""

from cscs_storage_daemon.api.app import OfferingInfo, create_app
from cscs_storage_daemon.api.auth import (
    Authenticator,
    AuthResult,
    NoAuth,
    OidcAuth,
    TokenAuth,
    build_authenticator,
    check_listen_allowed,
)
from cscs_storage_daemon.api.server import ApiServer

__all__ = [
    "ApiServer",
    "AuthResult",
    "Authenticator",
    "NoAuth",
    "OfferingInfo",
    "OidcAuth",
    "TokenAuth",
    "build_authenticator",
    "check_listen_allowed",
    "create_app",
]
