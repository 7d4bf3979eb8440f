"""Dialling a bridge, shared by the agent, ``rproxy tcp`` and ``rproxy status``: URL rules, TLS and
pinning, access checks, the key challenge and the Authorization value, refusal messages. Nothing
here imports the bridge."""

from __future__ import annotations

from .access import check_bridge_access, check_credential
from .challenge import ChallengeError, authorization, bridge_http_url, fetch_nonce, get_json
from .redact import NoSecretsFilter
from .refusal import NOT_A_BRIDGE, FatalRefusal, describe_error, refusal_error
from .sockets import NoRedirects, OwnedSessionFrameSocket
from .tls import PinMismatch, bridge_tls_context, certificate_sha256, pinned_sha256, untrusted_message
from .urls import bridge_connect_url, is_cleartext_remote, is_loopback_host, split_bridge_credential

__all__ = [
    "ChallengeError",
    "authorization",
    "bridge_http_url",
    "fetch_nonce",
    "get_json",
    "NOT_A_BRIDGE",
    "FatalRefusal",
    "NoRedirects",
    "NoSecretsFilter",
    "OwnedSessionFrameSocket",
    "PinMismatch",
    "bridge_connect_url",
    "bridge_tls_context",
    "certificate_sha256",
    "check_bridge_access",
    "check_credential",
    "describe_error",
    "is_cleartext_remote",
    "is_loopback_host",
    "pinned_sha256",
    "refusal_error",
    "split_bridge_credential",
    "untrusted_message",
]
