"""An agent's Ed25519 identity, shared by the agent side and the bridge: key text, fingerprints,
derived tunnel names, and what a signature covers.

An agent proves it holds a key by signing a nonce the bridge just gave it. The signed message
also names the tunnel and the bridge's host, so a signature is good for one registration of
one name at one bridge, once. This module is neutral ground: the agent, ``rproxy tcp`` and the
bridge all import it, so it imports nothing of theirs (no I/O beyond reading a key file).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .exceptions import ConfigError

__all__ = [
    "AUTH_SCHEME",
    "decode_public_key",
    "derived_name",
    "encode_public_key",
    "fingerprint",
    "load_private_key",
    "sign",
    "signed_message",
    "verify_signature",
]

#: The Authorization scheme of a key-holding agent: ``Rproxy-Key <public key> <nonce> <signature>``.
AUTH_SCHEME = "Rproxy-Key"
#: Prefix of every signed message: a signature made for anything else never verifies as this.
_DOMAIN = b"rproxy-agent-auth-v1\0"
_RAW_KEY_BYTES = 32
#: Characters of a derived tunnel name: 16 base32 characters are 80 bits of the key's hash, far
#: beyond what anyone could grind to land on a name someone else already has.
_DERIVED_NAME_LENGTH = 16


def encode_public_key(key: Ed25519PublicKey) -> str:
    """The key as standard base64 of its 32 raw bytes (the form in authorized-keys files)."""
    return base64.b64encode(key.public_bytes_raw()).decode("ascii")


def decode_public_key(text: str) -> bytes:
    """Raw 32 key bytes from base64 (ValueError if it is not exactly that)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("the public key is not base64") from None
    if len(raw) != _RAW_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {_RAW_KEY_BYTES} bytes, this one {len(raw)}")
    return raw


def fingerprint(raw_key: bytes) -> str:
    """``SHA256:<base64>`` of the raw key, the way ssh shows key fingerprints."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw_key).digest()).decode("ascii").rstrip("=")


def derived_name(raw_key: bytes) -> str:
    """The tunnel name an open-registration bridge gives this key: a DNS label from its hash."""
    digest = hashlib.sha256(raw_key).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:_DERIVED_NAME_LENGTH]


def signed_message(nonce: str, name: str, host: str) -> bytes:
    """What the agent signs: the nonce, the tunnel name and the bridge's host name (no port)."""
    return _DOMAIN + nonce.encode() + b"\0" + name.encode() + b"\0" + host.lower().encode()


def sign(private_key: Ed25519PrivateKey, nonce: str, name: str, host: str) -> str:
    """The ``Authorization`` value an agent sends for this nonce, name and bridge host."""
    signature = private_key.sign(signed_message(nonce, name, host))
    public = encode_public_key(private_key.public_key())
    return f"{AUTH_SCHEME} {public} {nonce} {base64.b64encode(signature).decode('ascii')}"


def verify_signature(raw_key: bytes, signature_b64: str, message: bytes) -> bool:
    try:
        signature = base64.b64decode(signature_b64.encode("ascii"), validate=True)
        Ed25519PublicKey.from_public_bytes(raw_key).verify(signature, message)
    except (binascii.Error, UnicodeEncodeError, ValueError, InvalidSignature):
        return False
    return True


def load_private_key(path: str) -> Ed25519PrivateKey:
    """The agent's key from a PEM file (ConfigError names the file, never its content)."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as err:
        raise ConfigError(f"--key {path}: cannot read: {err.strerror or err}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"--key {path}: not an unencrypted PEM private key (rproxy keygen writes one)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"--key {path}: expected an Ed25519 key, got {type(key).__name__}")
    return key
