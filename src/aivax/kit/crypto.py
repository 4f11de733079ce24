"""Secrets: API-key format with checksum, HMAC storage, purpose-bound derived keys, encryption.

Key format: ``<prefix><body><checksum>`` where the body is 32 base62 characters drawn from
``secrets`` (32 * log2(62) ≈ 190 bits of entropy) and the checksum is the CRC32 of
``prefix + body`` as 6 base62 characters. A mistyped key fails the checksum and is rejected
without touching the database (the same idea as GitHub's token format).
"""

from __future__ import annotations

import base64
import functools
import hmac
import re
import secrets
import string
import zlib

from cryptography.fernet import Fernet, InvalidToken

BASE62 = string.digits + string.ascii_letters
KEY_BODY_LENGTH = 32
KEY_CHECKSUM_LENGTH = 6
DISPLAY_CHARS = 4
_WELL_FORMED = re.compile(f"[0-9A-Za-z]{{{KEY_BODY_LENGTH + KEY_CHECKSUM_LENGTH}}}")


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        chars.append(BASE62[rem])
    return "".join(reversed(chars))


def _checksum(prefix: str, body: str) -> str:
    return _base62(zlib.crc32(f"{prefix}{body}".encode()), KEY_CHECKSUM_LENGTH)


def generate_token(prefix: str) -> str:
    body = "".join(secrets.choice(BASE62) for _ in range(KEY_BODY_LENGTH))
    return f"{prefix}{body}{_checksum(prefix, body)}"


def token_is_well_formed(token: str, prefix: str) -> bool:
    """Format and checksum check; cheap, constant work, no database."""
    if not token.startswith(prefix):
        return False
    rest = token[len(prefix) :]
    if not _WELL_FORMED.fullmatch(rest):
        return False
    body, checksum = rest[:KEY_BODY_LENGTH], rest[KEY_BODY_LENGTH:]
    return hmac.compare_digest(checksum, _checksum(prefix, body))


def display_prefix(token: str, prefix: str) -> str:
    """What the API shows instead of a key: its kind prefix and first characters."""
    return token[: len(prefix) + DISPLAY_CHARS]


@functools.lru_cache(maxsize=16)
def derive_key(secret: bytes, purpose: str) -> bytes:
    """One sub-key per purpose, so a key hash can never be used as an encryption key."""
    return hmac.digest(secret, f"aivax:{purpose}".encode(), "sha256")


def token_hash(secret: bytes, token: str) -> str:
    """HMAC-SHA256 of a token under the server's key-hashing sub-key (hex). Each call copies
    an HMAC already keyed: on every request, the key setup would cost more than the hash."""
    keyed = _keyed_hmac(secret).copy()
    keyed.update(token.encode())
    return keyed.hexdigest()


@functools.lru_cache(maxsize=4)
def _keyed_hmac(secret: bytes) -> hmac.HMAC:
    return hmac.new(derive_key(secret, "api-key-hmac"), digestmod="sha256")


class SecretBox:
    """Authenticated encryption (Fernet: AES-128-CBC + HMAC-SHA256) for secrets at rest."""

    def __init__(self, secret: bytes, purpose: str = "secrets-at-rest") -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(derive_key(secret, purpose)))

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken as exc:
            raise ValueError("secret cannot be decrypted with this server secret") from exc


def random_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)
