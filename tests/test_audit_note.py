"""Signed notes and checkpoint texts (``popproxy.audit._note``, ``_checkpoint``).

The known-answer vectors are those of Go's ``golang.org/x/mod/sumdb/note``
package (``note_test.go``: TestNewVerifier, TestNewSigner, TestSign,
TestOpen), used here as data: the same private key must give the same
verifier key, the same signature line byte for byte, and Go's notes must
open (or fail) the same way.
"""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.audit._checkpoint import checkpoint_text, parse_checkpoint_text
from popproxy.audit._note import (
    NoteError,
    Signature,
    Signer,
    Verifier,
    key_hash,
    open_note,
    parse_note,
    sign_note,
)

# From golang.org/x/mod/sumdb/note/note_test.go.
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = ("If you think cryptography is the answer to your problem,\n"
        "then you don't know what your problem is.\n")
PETER_SIG = ("— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
             "ngotpRZb6KE6RyyBwJnAM=\n")
ENOCH_SIG = ("— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01o"
             "OTGwnWLox33WWd1RvMc+QQ=\n")
PETER = Signature("PeterNeumann", 0xC74F20A3, PETER_SIG.split()[2])
ENOCH = Signature("EnochRoot", 0xAF0CFE78, ENOCH_SIG.split()[2])


class TestGoVectors:
    def test_sign_is_byte_for_byte_go_s(self) -> None:
        """TestSign: the same key and text give the same note, byte for byte."""
        signer = Signer.parse(PETER_SKEY)
        assert sign_note(TEXT, signer) == TEXT + "\n" + PETER_SIG
        assert sign_note(TEXT, signer).encode() == (TEXT + "\n" + PETER_SIG).encode("utf-8")

    def test_keys_round_trip(self) -> None:
        """The private key gives Go's verifier key; both write back unchanged."""
        signer = Signer.parse(PETER_SKEY)
        assert (signer.name, signer.key_hash) == ("PeterNeumann", 0xC74F20A3)
        assert str(signer.verifier) == PETER_VKEY
        assert signer.private_text() == PETER_SKEY
        assert str(Verifier.parse(PETER_VKEY)) == PETER_VKEY
        assert Verifier.parse(PETER_VKEY) == signer.verifier

    def test_key_hash_definition(self) -> None:
        """SHA-256(name || "\\n" || 0x01 || public key), first four bytes."""
        public = base64.b64decode(PETER_VKEY.split("+")[2])
        assert key_hash("PeterNeumann", public) == 0xC74F20A3

    def test_open_one_verified_one_not(self) -> None:
        note = open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [Verifier.parse(PETER_VKEY)])
        assert note.text == TEXT
        assert (note.signatures, note.unverified) == ((PETER,), (ENOCH,))

    def test_open_both_verified(self) -> None:
        """Go's second key signed the same text: its signature checks with its key alone."""
        keys = [Verifier.parse(PETER_VKEY), Verifier.parse(ENOCH_VKEY)]
        note = open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, keys)
        assert (note.signatures, note.unverified) == ((PETER, ENOCH), ())

    def test_open_without_a_known_key_fails(self) -> None:
        with pytest.raises(NoteError, match="no signature by a known key"):
            open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [])

    def test_invalid_signature(self) -> None:
        """Go's mangled signature (ABCD inserted) is an invalid signature, named."""
        bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
        with pytest.raises(NoteError, match=r"invalid signature for key PeterNeumann\+c74f20a3"):
            open_note(TEXT + "\n" + bad, [Verifier.parse(PETER_VKEY)])

    @pytest.mark.parametrize("message", [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT + "\n" + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2"
        "pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG * 101,
    ])
    def test_malformed_notes(self, message: str) -> None:
        """Go's badMsgs, and too many signatures: malformed."""
        with pytest.raises(NoteError, match="malformed"):
            open_note(message, [Verifier.parse(PETER_VKEY)])

    def test_not_utf8_is_malformed(self) -> None:
        with pytest.raises(NoteError, match="malformed"):
            open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), [Verifier.parse(PETER_VKEY)])

    def test_verifier_manglings_are_rejected(self) -> None:
        """TestNewVerifier: every proper substring and every byte changed is no key."""
        b = PETER_VKEY
        for i in range(len(b) + 1):
            for j in range(i + 1, len(b) + 1):
                if (i, j) != (0, len(b)):
                    with pytest.raises(NoteError):
                        Verifier.parse(b[i:j])
        for i in range(len(b)):
            with pytest.raises(NoteError):
                Verifier.parse(b[:i] + chr(ord(b[i]) + 1) + b[i + 1:])
        # Wrong key length and unknown algorithm, each with a matching key hash.
        for bad in ("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
                    "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"):
            with pytest.raises(NoteError):
                Verifier.parse(bad)

    def test_signer_manglings_are_rejected_without_showing_the_key(self) -> None:
        """TestNewSigner: manglings fail; no error message quotes the secret."""
        b = PETER_SKEY
        secret = b.split("+")[-1]
        cases = [b[i:j] for i in range(0, len(b), 3) for j in range(i + 1, len(b) + 1, 5)
                 if (i, j) != (0, len(b))]
        cases += [b[:i] + chr(ord(b[i]) + 1) + b[i + 1:] for i in range(len(b))]
        for case in cases:
            with pytest.raises(NoteError) as caught:
                Signer.parse(case)
            assert secret[:12] not in str(caught.value)

    def test_signer_repr_hides_the_key(self) -> None:
        signer = Signer.parse(PETER_SKEY)
        assert "AYEKFALV" not in repr(signer)
        assert repr(signer) == "Signer('PeterNeumann', c74f20a3)"


names = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"),
                              blacklist_characters="+"), min_size=1, max_size=40)
texts = st.lists(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60),
    min_size=1, max_size=6,
).map(lambda lines: "".join(line + "\n" for line in lines))


class TestProperties:
    @given(seed=st.binary(min_size=32, max_size=32), name=names, text=texts)
    def test_sign_then_open(self, seed: bytes, name: str, text: str) -> None:
        """Any key and text: the note opens with the key, to the same text;
        the key files read back to the same key."""
        signer = Signer(name, seed)
        note = sign_note(text, signer)
        opened = open_note(note, [signer.verifier])
        assert opened.text == text
        assert Signer.parse(signer.private_text()) == signer
        assert Verifier.parse(str(signer.verifier)) == signer.verifier

    @given(data=st.data())
    def test_any_change_to_a_signed_note_is_caught(self, data: st.DataObject) -> None:
        """Change one byte of Go's note anywhere: it no longer opens to the same text."""
        note = bytearray((TEXT + "\n" + PETER_SIG).encode("utf-8"))
        i = data.draw(st.integers(0, len(note) - 1))
        new = data.draw(st.integers(0, 255).filter(lambda b: b != note[i]))
        note[i] = new
        try:
            opened = open_note(bytes(note), [Verifier.parse(PETER_VKEY)])
        except NoteError:
            return
        assert opened.text != TEXT or opened.signatures != (PETER,)

    @given(st.binary(max_size=400))
    def test_parse_note_takes_any_bytes(self, message: bytes) -> None:
        """Garbage is a NoteError, never another exception."""
        with contextlib.suppress(NoteError):
            parse_note(message)


class TestCheckpointText:
    def test_format(self) -> None:
        """origin, size, base64 of the 32-byte hash, one a line."""
        text = checkpoint_text("mail.example.org/popproxy", 1000, "ab" * 32)
        assert text == ("mail.example.org/popproxy\n1000\n"
                        + base64.b64encode(bytes.fromhex("ab" * 32)).decode() + "\n")

    @given(origin=names, seq=st.integers(0, 2**63 - 1),
           digest=st.binary(min_size=32, max_size=32))
    def test_round_trip(self, origin: str, seq: int, digest: bytes) -> None:
        text = checkpoint_text(origin, seq, digest.hex())
        assert parse_checkpoint_text(text) == (origin, seq, digest.hex())

    @pytest.mark.parametrize(("text", "reason"), [
        ("o\n1\n", "expected origin, size and hash"),
        ("\n1\n" + "A" * 43 + "=\n", "empty origin"),
        ("o\n01\n" + "A" * 43 + "=\n", "not a decimal"),
        ("o\n-1\n" + "A" * 43 + "=\n", "not a decimal"),
        ("o\n1\n" + "A" * 42 + "==\n", "31 bytes"),
        ("o\n1\n!!!\n", "not base64"),
        ("o\n1\n" + "A" * 43 + "=\n\n", "empty extension"),
        ("o\n1\n" + "A" * 43 + "=", "expected origin"),
    ])
    def test_malformed(self, text: str, reason: str) -> None:
        with pytest.raises(NoteError, match=reason):
            parse_checkpoint_text(text)

    def test_extension_lines_are_accepted(self) -> None:
        text = checkpoint_text("o", 5, "00" * 32) + "extension\n"
        assert parse_checkpoint_text(text) == ("o", 5, "00" * 32)
