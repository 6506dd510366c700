"""Who may post images: with a bearer token set, whoever sends it; without one, only this machine (loopback).

Reads (the page, /health, /model, /history, /stats, overlays) stay open: a station that must keep its history
private listens on 127.0.0.1 (the default) or behind a reverse proxy that authenticates.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from patchae.deploy.serve.uploads import Refused
from patchae.errors import PatchAEError

TOKEN_VARIABLE = "PATCHAE_SERVE_TOKEN"


def resolve_token(configured: str | None) -> str | None:
    """``auth.token`` when set, else the environment variable; None when neither is (loopback only)."""
    token = configured if configured not in (None, "") else os.environ.get(TOKEN_VARIABLE, "")
    token = str(token)
    if not token:
        return None
    if token != token.strip() or any(character.isspace() for character in token):
        raise PatchAEError(f"the bearer token (auth.token or {TOKEN_VARIABLE}) must not contain spaces")
    return token


def is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:  # a unix socket, a test client's made-up name: not provably this machine
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def check_client(host: str | None, authorization: str | None, token: str | None) -> None:
    """Raise :class:`Refused` (401 / 403) unless this client may post."""
    if token is not None:
        scheme, _, sent = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token.encode()):
            raise Refused(401, "missing or wrong bearer token; send -H 'Authorization: Bearer <token>'")
        return
    if not is_loopback(host):
        raise Refused(
            403,
            f"posting from {host or 'an unknown address'} needs a token: start the station with "
            f"{TOKEN_VARIABLE} (or auth.token) set and send -H 'Authorization: Bearer <token>'",
        )
