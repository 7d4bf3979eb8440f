"""TLS towards a bridge: the verifying context, certificate pinning checked inside the handshake, fingerprints."""

from __future__ import annotations

import hashlib
import ssl

import voluptuous as vol

from ..config import parse_sha256_pin
from ..exceptions import ConfigError

__all__ = ["PinMismatch", "bridge_tls_context", "certificate_sha256", "pinned_sha256", "untrusted_message"]


def certificate_sha256(der: bytes) -> str:
    """A certificate's SHA-256 fingerprint as ``openssl x509 -fingerprint -sha256`` prints it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


class PinMismatch(ssl.SSLCertVerificationError):
    """The bridge's certificate is none of the pinned ones; ``seen`` is its fingerprint."""

    def __init__(self, seen: str) -> None:
        super().__init__(1, f"certificate SHA-256 {seen} is not pinned")
        self.seen = seen


class _PinCheckingSSLObject(ssl.SSLObject):
    """Checks the pins as the handshake completes, so a wrong certificate fails the TLS
    connection itself: the upgrade request, token included, is never written to it."""

    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError until the handshake is done
        pins: frozenset[str] = getattr(self.context, "pins", frozenset())
        der = self.getpeercert(binary_form=True) or b""
        if hashlib.sha256(der).hexdigest() not in pins:
            raise PinMismatch(certificate_sha256(der))


class _PinnedContext(ssl.SSLContext):
    """A client context whose connections also check the peer's certificate against ``pins``
    (SHA-256 of the DER certificate, lower-case hex). The event loops of asyncio and uvloop
    both wrap TLS with ``context.wrap_bio``, which makes ``sslobject_class`` objects."""

    sslobject_class = _PinCheckingSSLObject
    pins: frozenset[str] = frozenset()


def bridge_tls_context(ca_file: str | None, pins: frozenset[str]) -> ssl.SSLContext | None:
    """The context verifying the bridge; None leaves it to the system's CAs.

    A pin is enough on its own: it names the one certificate to accept (a self-signed bridge
    needs nothing else), so neither a CA nor the host name is checked. With ``ca_file`` too,
    both must hold.

    Raises:
        ConfigError: ``ca_file`` cannot be read or holds no certificate.
    """
    if ca_file is None and not pins:
        return None
    context: ssl.SSLContext
    if pins:
        pinned = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.pins = pins
        context = pinned
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise ConfigError(f"--ca-file {ca_file!r}: no such file") from None
    except OSError as err:  # ssl.SSLError too: a file without one PEM certificate
        reason = err.strerror if not isinstance(err, ssl.SSLError) else "no PEM certificate in it"
        raise ConfigError(f"--ca-file {ca_file!r}: {reason or err}") from None
    return context


def pinned_sha256(pins: tuple[str, ...]) -> frozenset[str]:
    """``--pin-sha256`` values as lower-case hex without colons (ConfigError names a malformed one)."""
    try:
        return frozenset(parse_sha256_pin(pin) for pin in pins)
    except vol.Invalid as err:
        raise ConfigError(f"--pin-sha256: {err.msg}") from None


def untrusted_message(err: ssl.SSLCertVerificationError, ca_file: str | None) -> str:
    """Why the bridge's certificate was refused, with what to change: the one text every client of a bridge shows."""
    if isinstance(err, PinMismatch):
        return (
            f"the bridge's certificate does not match --pin-sha256: it has SHA-256 {err.seen}; if the "
            "bridge's certificate was replaced, pin the new one, otherwise someone may be intercepting "
            "the connection"
        )
    reason = err.verify_message or err.reason or str(err)
    if ca_file:
        hint = f"is it issued by a CA in --ca-file {ca_file!r}?"
    else:
        hint = "for a private CA give --ca-file, for a self-signed certificate --pin-sha256"
    return f"the bridge's certificate is not trusted: {reason} ({hint})"
