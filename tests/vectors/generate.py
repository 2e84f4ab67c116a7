#!/usr/bin/env python3
"""Generate the fastPort end-to-end encryption test vectors.

This is an independent reference implementation of the NATIVE_V1 and
LEGACY_JSON formats, written against the Python `cryptography` package (it
shares no code with the Rust SDK in src/client/crypto.rs). Every input is
fixed, so running it again reproduces the same files byte for byte:

    python3 tests/vectors/generate.py

writes tests/vectors/native_v1.json and tests/vectors/legacy_json.json next
to this script. See tests/vectors/README.md for the field descriptions.
"""

import base64
import hashlib
import hmac as std_hmac
import json
import struct
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

OUT_DIR = Path(__file__).resolve().parent

VERSION = 0x01
DOMAIN_MESSAGE = 0x01
DOMAIN_CHUNK = 0x02
DOMAIN_FILE_END = 0x03

# ---------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------


def hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    """HKDF-SHA256, empty salt, 32-byte output (checked against RFC 5869)."""
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=info).derive(ikm)
    # Cross-check with a direct RFC 5869 transcription using only the stdlib.
    prk = std_hmac.new(b"", ikm, hashlib.sha256).digest()
    t1 = std_hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    assert okm == t1, "HKDF mismatch"
    return okm


def derive_keys(session_key: bytes) -> tuple[bytes, bytes]:
    assert len(session_key) == 32
    return (
        hkdf_sha256(session_key, b"fastport/v1 enc"),
        hkdf_sha256(session_key, b"fastport/v1 mac"),
    )


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    tag = h.finalize()
    assert tag == std_hmac.new(key, data, hashlib.sha256).digest()
    return tag


def cbc_encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    assert len(key) == 32 and len(iv) == 16
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(padded) + enc.finalize()


def cbc_encrypt_nopad(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = dec.update(ciphertext) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


# ---------------------------------------------------------------------------
# NATIVE_V1
# ---------------------------------------------------------------------------


def u16_prefixed(text: str) -> bytes:
    raw = text.encode("utf-8")
    assert len(raw) <= 0xFFFF
    return struct.pack(">H", len(raw)) + raw


def envelope_mac_input(domain, session, topic, ident, timestamp_ms, index, iv, ct):
    assert len(ident) == 16 and len(iv) == 16
    out = bytes([domain]) + u16_prefixed(session) + u16_prefixed(topic)
    out += ident + struct.pack(">Q", timestamp_ms)
    if index is not None:
        out += struct.pack(">I", index)
    return out + iv + ct


def seal_native(session_key, domain, session, topic, ident, timestamp_ms, index, iv, plaintext):
    enc_key, mac_key = derive_keys(session_key)
    ct = cbc_encrypt(enc_key, iv, plaintext)
    mac_input = envelope_mac_input(domain, session, topic, ident, timestamp_ms, index, iv, ct)
    tag = hmac_sha256(mac_key, mac_input)
    payload = bytes([VERSION]) + iv + ct + tag
    # Self-check: open it again the way a receiver would.
    assert payload[0] == VERSION
    p_iv, p_ct, p_tag = payload[1:17], payload[17:-32], payload[-32:]
    again = envelope_mac_input(domain, session, topic, ident, timestamp_ms, index, p_iv, p_ct)
    assert std_hmac.compare_digest(hmac_sha256(mac_key, again), p_tag)
    assert cbc_decrypt(enc_key, p_iv, p_ct) == plaintext
    return payload, mac_input


def file_end_mac_input(file_id: bytes, chunk_count: int, sha256: bytes) -> bytes:
    assert len(file_id) == 16 and len(sha256) == 32
    return bytes([DOMAIN_FILE_END]) + file_id + struct.pack(">I", chunk_count) + sha256


# ---------------------------------------------------------------------------
# Fixed inputs
# ---------------------------------------------------------------------------

KEY_A = bytes(range(32))  # 00 01 02 ... 1f
KEY_B = hashlib.sha256(b"fastport test vector key B").digest()
KEY_C = bytes([0xFF] * 32)

ID_1 = bytes.fromhex("0123456789abcdef0123456789abcdef")
ID_2 = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")
FILE_ID = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")

IV_1 = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
IV_2 = bytes.fromhex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0")
IV_3 = bytes.fromhex("5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a")

TS_1 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
TS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, still exact in a double


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def native_case(name, kind, key, session, topic, ident, ts, iv, plaintext, index=None, note=None):
    domain = DOMAIN_MESSAGE if kind == "message" else DOMAIN_CHUNK
    enc_key, mac_key = derive_keys(key)
    payload, mac_input = seal_native(key, domain, session, topic, ident, ts, index, iv, plaintext)
    case = {"name": name, "kind": kind}
    if note:
        case["note"] = note
    case.update(
        {
            "session_key_b64": b64(key),
            "session": session,
            "topic": topic,
            "id_hex": ident.hex(),
            "timestamp_ms": ts,
        }
    )
    if index is not None:
        case["index"] = index
    case.update(
        {
            "iv_hex": iv.hex(),
            "plaintext_hex": plaintext.hex(),
            "enc_key_hex": enc_key.hex(),
            "mac_key_hex": mac_key.hex(),
            "mac_input_hex": mac_input.hex(),
            "payload_hex": payload.hex(),
        }
    )
    return case


def file_end_case(name, key, file_id, chunk_count, content, note=None):
    enc_key, mac_key = derive_keys(key)
    digest = hashlib.sha256(content).digest()
    mac_input = file_end_mac_input(file_id, chunk_count, digest)
    case = {"name": name, "kind": "file_end"}
    if note:
        case["note"] = note
    case.update(
        {
            "session_key_b64": b64(key),
            "id_hex": file_id.hex(),
            "chunk_count": chunk_count,
            "sha256_hex": digest.hex(),
            "enc_key_hex": enc_key.hex(),
            "mac_key_hex": mac_key.hex(),
            "mac_input_hex": mac_input.hex(),
            "mac_hex": hmac_sha256(mac_key, mac_input).hex(),
        }
    )
    return case


def flip(hex_payload: str, index: int) -> str:
    raw = bytearray(bytes.fromhex(hex_payload))
    raw[index] ^= 0x01
    return raw.hex()


def native_vectors():
    multi_block = b"The quick brown fox jumps over the lazy dog. " * 3
    chunk_data = bytes((i * 7 + 3) & 0xFF for i in range(100))
    cases = [
        native_case(
            "message_empty", "message", KEY_A, "demo", "chat/general", ID_1, TS_1, IV_1, b"",
            note="empty plaintext: the ciphertext is one block of padding",
        ),
        native_case(
            "message_short_ascii", "message", KEY_A, "demo", "chat/general", ID_1, TS_1, IV_2,
            b"hello, fastPort",
        ),
        native_case(
            "message_exact_block", "message", KEY_A, "demo", "chat/general", ID_2, TS_1, IV_3,
            b"0123456789abcdef",
            note="16-byte plaintext: PKCS#7 adds a whole block",
        ),
        native_case(
            "message_multi_block", "message", KEY_B, "team-42", "sensors/room-1/temperature",
            ID_2, TS_MAX, IV_1, multi_block,
        ),
        native_case(
            "message_utf8_topic", "message", KEY_B, "séance-ü", "capteurs/température/日本語",
            ID_1, 0, IV_2, "héllo wörld ✓ — 你好".encode("utf-8"),
            note="non-ASCII session and topic: lengths are UTF-8 byte counts; timestamp 0",
        ),
        native_case(
            "message_file_name", "message", KEY_C, "demo", "files/reports", FILE_ID, TS_1, IV_3,
            "rapport annuel 2024.pdf".encode("utf-8"),
            note="FileHeader.name: a message envelope with the file id as id and the header timestamp",
        ),
        native_case(
            "chunk_index_0", "chunk", KEY_C, "demo", "files/reports", FILE_ID, TS_1, IV_1,
            chunk_data, index=0,
        ),
        native_case(
            "chunk_index_byte_order", "chunk", KEY_C, "demo", "files/reports", FILE_ID, TS_1,
            IV_2, b"middle chunk", index=0x01020304,
            note="index 0x01020304 shows the big-endian encoding",
        ),
        native_case(
            "chunk_index_max", "chunk", KEY_B, "séance-ü", "fichiers/données", ID_2, TS_MAX,
            IV_3, b"", index=0xFFFFFFFF,
            note="largest chunk index, empty chunk",
        ),
        file_end_case(
            "file_end_three_chunks", KEY_C, FILE_ID, 3, b"hello file\n" * 10,
            note="sha256 is the digest of the whole plaintext file",
        ),
        file_end_case("file_end_empty_file", KEY_A, ID_1, 0, b"", note="zero chunks, sha256 of the empty string"),
        file_end_case("file_end_max_count", KEY_B, ID_2, 0xFFFFFFFF, b"x"),
    ]

    by_name = {c["name"]: c for c in cases}
    short = by_name["message_short_ascii"]
    chunk = by_name["chunk_index_byte_order"]
    end = by_name["file_end_three_chunks"]
    payload_len = len(bytes.fromhex(short["payload_hex"]))

    def context(case, **changes):
        keys = ["session_key_b64", "session", "topic", "id_hex", "timestamp_ms", "index"]
        out = {k: case[k] for k in keys if k in case}
        out.update(changes)
        return out

    def invalid(name, kind, base, payload_hex, error, **changes):
        return {"name": name, "kind": kind, **context(base, **changes), "payload_hex": payload_hex, "error": error}

    wrong_version = bytearray(bytes.fromhex(short["payload_hex"]))
    wrong_version[0] = 0x02
    invalid_cases = [
        invalid("flipped_iv_byte", "message", short, flip(short["payload_hex"], 1), "bad_mac"),
        invalid("flipped_ciphertext_byte", "message", short, flip(short["payload_hex"], 17), "bad_mac"),
        invalid("flipped_tag_byte", "message", short, flip(short["payload_hex"], payload_len - 1), "bad_mac"),
        invalid("wrong_topic", "message", short, short["payload_hex"], "bad_mac", topic="chat/General"),
        invalid("wrong_session", "message", short, short["payload_hex"], "bad_mac", session="demo2"),
        invalid("wrong_id", "message", short, short["payload_hex"], "bad_mac", id_hex=ID_2.hex()),
        invalid("wrong_timestamp", "message", short, short["payload_hex"], "bad_mac", timestamp_ms=TS_1 + 1),
        invalid("wrong_chunk_index", "chunk", chunk, chunk["payload_hex"], "bad_mac", index=0x04030201),
        invalid("chunk_opened_as_message", "message", chunk, chunk["payload_hex"], "bad_mac"),
        invalid("unsupported_version", "message", short, wrong_version.hex(), "unsupported_version"),
        invalid("truncated", "message", short, short["payload_hex"][: 2 * 64], "truncated"),
        invalid("empty_payload", "message", short, "", "truncated"),
    ]
    bad_end = {k: end[k] for k in ["session_key_b64", "id_hex", "sha256_hex"]}
    invalid_cases.append(
        {
            "name": "file_end_wrong_chunk_count",
            "kind": "file_end",
            **bad_end,
            "chunk_count": end["chunk_count"] + 1,
            "mac_hex": end["mac_hex"],
            "error": "bad_mac",
        }
    )
    for c in invalid_cases:
        if c["kind"] == "message":
            c.pop("index", None)

    return {
        "format": "NATIVE_V1",
        "description": (
            "fastPort NATIVE_V1 end-to-end encryption test vectors. Keys: HKDF-SHA256(session key, "
            "salt empty, info 'fastport/v1 enc' | 'fastport/v1 mac'). payload = 0x01 || IV || "
            "AES-256-CBC-PKCS7(plaintext) || HMAC-SHA256(mac key, domain || u16be len || session || "
            "u16be len || topic || id || u64be timestamp_ms || [u32be index] || IV || ciphertext). "
            "Domains: 0x01 message, 0x02 file chunk. file_end mac = HMAC-SHA256(mac key, 0x03 || "
            "file_id || u32be chunk_count || sha256). Each case in 'cases' must be reproduced byte "
            "for byte and open back to its plaintext; each case in 'invalid' must be rejected with "
            "the given error. Generated by tests/vectors/generate.py."
        ),
        "cases": cases,
        "invalid": invalid_cases,
    }


# ---------------------------------------------------------------------------
# LEGACY_JSON
# ---------------------------------------------------------------------------


def legacy_message_case(name, key, iv, plaintext, note=None):
    raw = plaintext.encode("utf-8")
    sealed = iv + cbc_encrypt(key, iv, raw)
    data = b64(sealed)
    digest = hashlib.sha256(raw).hexdigest()
    text = json.dumps({"data": data, "hash": digest}, separators=(",", ":"))
    assert cbc_decrypt(key, sealed[:16], sealed[16:]) == raw
    case = {"name": name, "kind": "message"}
    if note:
        case["note"] = note
    case.update(
        {"key_b64": b64(key), "iv_hex": iv.hex(), "plaintext": plaintext, "data": data, "hash": digest, "json": text}
    )
    return case


def legacy_chunk_case(name, key, iv, plaintext, note=None):
    sealed = iv + cbc_encrypt(key, iv, plaintext)
    assert cbc_decrypt(key, sealed[:16], sealed[16:]) == plaintext
    case = {"name": name, "kind": "chunk"}
    if note:
        case["note"] = note
    case.update({"key_b64": b64(key), "iv_hex": iv.hex(), "plaintext_hex": plaintext.hex(), "sealed_hex": sealed.hex()})
    return case


def legacy_vectors():
    cases = [
        legacy_message_case("legacy_empty", KEY_A, IV_1, ""),
        legacy_message_case("legacy_short_ascii", KEY_A, IV_2, "hello from dart"),
        legacy_message_case(
            "legacy_utf8_multi_block", KEY_B, IV_3, "Grüße aus Köln — ✓ 日本語のテキスト, " * 2,
            note="hash is over the UTF-8 bytes",
        ),
        legacy_message_case("legacy_json_payload", KEY_C, IV_1, '{"temp":21.5,"unit":"C"}',
                            note="the plaintext may itself be JSON text; it is encrypted as-is"),
        legacy_chunk_case("legacy_chunk_empty", KEY_A, IV_3, b""),
        legacy_chunk_case("legacy_chunk_binary", KEY_B, IV_1, bytes(range(256)) + b"\x00\xff"),
        legacy_chunk_case("legacy_chunk_exact_block", KEY_C, IV_2, b"\x10" * 16),
    ]

    short = cases[1]
    wrong_hash = hashlib.sha256(b"hello from dart!").hexdigest()
    bad_pad_sealed = IV_1 + cbc_encrypt_nopad(KEY_A, IV_1, bytes(16))  # last plaintext byte 0x00
    invalid = [
        {
            "name": "legacy_hash_mismatch",
            "key_b64": short["key_b64"],
            "json": json.dumps({"data": short["data"], "hash": wrong_hash}, separators=(",", ":")),
            "error": "hash_mismatch",
        },
        {
            "name": "legacy_bad_padding",
            "key_b64": b64(KEY_A),
            "json": json.dumps(
                {"data": b64(bad_pad_sealed), "hash": hashlib.sha256(b"").hexdigest()}, separators=(",", ":")
            ),
            "error": "bad_padding",
        },
        {
            "name": "legacy_not_an_object",
            "key_b64": short["key_b64"],
            "json": json.dumps([short["data"], short["hash"]]),
            "error": "bad_legacy_json",
        },
    ]

    return {
        "format": "LEGACY_JSON",
        "description": (
            "fastPort LEGACY_JSON test vectors (compatibility with the old Dart clients). The raw "
            "32-byte session key is the AES-256 key (no HKDF). A message is the JSON text "
            "{\"data\":base64(IV || AES-256-CBC-PKCS7(utf-8 plaintext)),\"hash\":hex(sha256(utf-8 "
            "plaintext))}, written compactly with 'data' first. A chunk is the binary IV || "
            "AES-256-CBC-PKCS7(chunk). Readers decrypt, then check the hash. Generated by "
            "tests/vectors/generate.py."
        ),
        "cases": cases,
        "invalid": invalid,
    }


def write(name: str, obj) -> None:
    path = OUT_DIR / name
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    write("native_v1.json", native_vectors())
    write("legacy_json.json", legacy_vectors())
