"""Signed notes (C2SP ``signed-note``) with Ed25519 keys: keys, signing, opening.

A signed note is UTF-8 text that ends in a newline, a blank line, and one
line per signature::

    <text, one or more lines>\\n
    \\n
    — <key name> <base64(4-byte key hash || 64-byte Ed25519 signature)>\\n

The key hash is the first four bytes (big-endian) of
``SHA-256(name || "\\n" || 0x01 || public key)``; 0x01 is the Ed25519
algorithm byte.  A verifier key is written ``<name>+<hash, 8 hex
digits>+<base64(0x01 || public key)>``, the private key file of
``popproxy audit keygen`` holds ``PRIVATE+KEY+<name>+<hash>+<base64(0x01 ||
32-byte seed)>``: the forms of Go's ``golang.org/x/mod/sumdb/note``, so its
verifiers and ours read each other's notes and keys (the tests hold this
module to that package's known-answer vector).

Ed25519 itself is the ``cryptography`` package's (OpenSSL's); this module
only does the text formats.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ALG_ED25519",
    "MAX_SIGNATURES",
    "Note",
    "NoteError",
    "Signature",
    "Signer",
    "Verifier",
    "key_hash",
    "open_note",
    "parse_note",
    "parse_verifiers",
    "sign_note",
    "signature_line",
    "valid_name",
]

ALG_ED25519 = 0x01
MAX_SIGNATURES = 100  # more than this in one note is malformed (as in Go's package)
SIG_PREFIX = "— "  # an em dash (U+2014) and a space

_HASH = re.compile(r"[0-9a-f]{8}")


class NoteError(ValueError):
    """A malformed note or key, or a signature that does not verify."""


def valid_name(name: str) -> bool:
    """A key name: not empty, no white space, no ``+``."""
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def key_hash(name: str, key: bytes) -> int:
    """The 32-bit id of a key: SHA-256(name || "\\n" || key)[:4], big-endian.

    ``key`` is the algorithm byte followed by the public key.
    """
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + key).digest()
    return int.from_bytes(digest[:4], "big")


def _b64decode(text: str) -> bytes:
    """Strict standard base64 (padding required, nothing else allowed)."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise NoteError(f"bad base64: {exc}") from None


class Verifier:
    """A named Ed25519 public key that checks signatures."""

    __slots__ = ("_public", "key_hash", "name")

    def __init__(self, name: str, public: bytes) -> None:
        if not valid_name(name):
            raise NoteError(f"bad key name {name!r}: it must be non-empty, without spaces or '+'")
        if len(public) != 32:
            raise NoteError(f"an Ed25519 public key has 32 bytes, not {len(public)}")
        self.name = name
        self.key_hash = key_hash(name, bytes([ALG_ED25519]) + public)
        self._public = Ed25519PublicKey.from_public_bytes(public)

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """Read ``<name>+<hash>+<base64(0x01 || public key)>``."""
        vkey = vkey.strip()
        # Split from the left: a name has no "+", the base64 key may.
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise NoteError("not a verifier key: expected NAME+HASH+KEY")
        name, hash_hex, key64 = parts
        if not _HASH.fullmatch(hash_hex):
            raise NoteError("not a verifier key: the key hash is not 8 hex digits")
        key = _b64decode(key64)
        if len(key) < 1 or key[0] != ALG_ED25519:
            raise NoteError("not a verifier key: unknown algorithm (only Ed25519, 0x01)")
        verifier = cls(name, key[1:])
        if verifier.key_hash != int(hash_hex, 16):
            raise NoteError("not a verifier key: the key hash does not match the key")
        return verifier

    @property
    def public_bytes(self) -> bytes:
        return self._public.public_bytes_raw()

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Is ``signature`` (64 bytes, no key hash) this key's over ``message``?"""
        try:
            self._public.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        key = base64.b64encode(bytes([ALG_ED25519]) + self.public_bytes).decode("ascii")
        return f"{self.name}+{self.key_hash:08x}+{key}"

    def __repr__(self) -> str:
        return f"Verifier({self.name!r}, {self.key_hash:08x})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Verifier) and self.name == other.name
                and self.public_bytes == other.public_bytes)

    def __hash__(self) -> int:
        return hash((self.name, self.key_hash))


class Signer:
    """A named Ed25519 private key.  Its ``repr`` never shows the key."""

    __slots__ = ("_private", "_seed", "key_hash", "name", "verifier")

    def __init__(self, name: str, seed: bytes) -> None:
        if len(seed) != 32:
            raise NoteError(f"an Ed25519 private key (seed) has 32 bytes, not {len(seed)}")
        self._seed = seed
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self.verifier = Verifier(name, self._private.public_key().public_bytes_raw())
        self.name = name
        self.key_hash = self.verifier.key_hash

    @classmethod
    def generate(cls, name: str) -> Signer:
        """A new random key (from the operating system's CSPRNG, via OpenSSL)."""
        seed = Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(name, seed)

    @classmethod
    def parse(cls, skey: str) -> Signer:
        """Read ``PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>``.

        Errors never quote the text: it is a secret.
        """
        skey = skey.strip()
        if not skey.startswith("PRIVATE+KEY+"):
            raise NoteError("not a private key: expected PRIVATE+KEY+NAME+HASH+KEY")
        parts = skey[len("PRIVATE+KEY+"):].split("+", 2)
        if len(parts) != 3:
            raise NoteError("not a private key: expected PRIVATE+KEY+NAME+HASH+KEY")
        name, hash_hex, key64 = parts
        if not _HASH.fullmatch(hash_hex):
            raise NoteError("not a private key: the key hash is not 8 hex digits")
        try:
            key = base64.b64decode(key64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise NoteError("not a private key: the key is not base64") from None
        if len(key) < 1 or key[0] != ALG_ED25519:
            raise NoteError("not a private key: unknown algorithm (only Ed25519, 0x01)")
        signer = cls(name, key[1:])
        if signer.key_hash != int(hash_hex, 16):
            raise NoteError("not a private key: the key hash does not match the key")
        return signer

    def private_text(self) -> str:
        """The key file's content (without a newline): keep it secret."""
        key = base64.b64encode(bytes([ALG_ED25519]) + self._seed).decode("ascii")
        return f"PRIVATE+KEY+{self.name}+{self.key_hash:08x}+{key}"

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._private.sign(message)

    def __repr__(self) -> str:
        return f"Signer({self.name!r}, {self.key_hash:08x})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signer) and self.private_text() == other.private_text()

    def __hash__(self) -> int:
        return hash((self.name, self.key_hash))


@dataclass(frozen=True)
class Signature:
    """One signature line: the key's name and hash, and its base64 text."""

    name: str
    key_hash: int
    base64: str


@dataclass(frozen=True)
class Note:
    """An opened note: its text, the signatures that verified, the others."""

    text: str
    signatures: tuple[Signature, ...]
    unverified: tuple[Signature, ...]


def _check_text(text: str) -> None:
    if not text or not text.endswith("\n"):
        raise NoteError("malformed note: the text must end with a newline")
    if any(c < " " and c != "\n" for c in text):
        raise NoteError("malformed note: control characters in the text")


def signature_line(signer: Signer, text: str) -> str:
    """``— <name> <base64(key hash || signature)>\\n`` over ``text``."""
    sig = signer.key_hash.to_bytes(4, "big") + signer.sign(text.encode("utf-8"))
    return f"{SIG_PREFIX}{signer.name} {base64.b64encode(sig).decode('ascii')}\n"


def sign_note(text: str, *signers: Signer) -> str:
    """``text``, a blank line and one signature line per signer."""
    _check_text(text)
    if not signers:
        raise NoteError("no signer")
    return text + "\n" + "".join(signature_line(s, text) for s in signers)


def _parse_signature(line: str) -> tuple[Signature, bytes]:
    if not line.startswith(SIG_PREFIX):
        raise NoteError("malformed note: a signature line must start with '— '")
    name, _, b64 = line[len(SIG_PREFIX):].partition(" ")
    if not valid_name(name) or not b64:
        raise NoteError("malformed note: bad signature line")
    raw = _b64decode(b64)
    if len(raw) < 5:
        raise NoteError("malformed note: signature too short")
    return Signature(name, int.from_bytes(raw[:4], "big"), b64), raw[4:]


def parse_note(message: str | bytes) -> tuple[str, list[tuple[Signature, bytes]]]:
    """Split a signed note into its text and its signatures (not checked):
    ``(text, [(signature, raw 64-byte signature), ...])``.  Raises
    ``NoteError`` when it is malformed."""
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("malformed note: not UTF-8") from None
    if any(c < " " and c != "\n" for c in message):
        raise NoteError("malformed note: control characters")
    split = message.rfind("\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line before the signatures")
    text, block = message[:split + 1], message[split + 2:]
    if not block or not block.endswith("\n"):
        raise NoteError("malformed note: no signature, or no newline after the last")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"malformed note: more than {MAX_SIGNATURES} signatures")
    return text, [_parse_signature(line) for line in lines]


def open_note(message: str | bytes, verifiers: Iterable[Verifier]) -> Note:
    """Parse a signed note and check its signatures against ``verifiers``.

    Signatures by keys not in ``verifiers`` are returned as unverified.
    Raises ``NoteError`` for a malformed note, for a signature by a known
    key that does not verify, and when no signature verifies.
    """
    text, signatures = parse_note(message)
    known: dict[tuple[str, int], list[Verifier]] = {}
    for v in verifiers:
        known.setdefault((v.name, v.key_hash), []).append(v)
    good: list[Signature] = []
    other: list[Signature] = []
    for sig, raw in signatures:
        candidates = known.get((sig.name, sig.key_hash))
        if not candidates:
            if sig not in other:
                other.append(sig)
            continue
        if len({c.public_bytes for c in candidates}) > 1:
            raise NoteError(f"ambiguous key {sig.name}+{sig.key_hash:08x}")
        if sig in good:
            continue
        if not candidates[0].verify(text.encode("utf-8"), raw):
            raise NoteError(f"invalid signature for key {sig.name}+{sig.key_hash:08x}")
        good.append(sig)
    if not good:
        raise NoteError("the note has no signature by a known key")
    return Note(text, tuple(good), tuple(other))


def parse_verifiers(texts: Sequence[str]) -> list[Verifier]:
    """Verifier keys, one per non-empty line of each text."""
    return [Verifier.parse(line) for text in texts for line in text.splitlines() if line.strip()]
