//! Checks `fastport::client::crypto` against the reference test vectors in
//! `tests/vectors/` (produced by the independent Python implementation in
//! `tests/vectors/generate.py`). Every payload and MAC must match byte for
//! byte, open back to its plaintext, and every invalid case must be rejected
//! with the documented error.

use fastport::client::crypto::{CryptoError, MessageContext, SealingKeys, SessionKey};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const NATIVE_V1: &str = include_str!("vectors/native_v1.json");
const LEGACY_JSON: &str = include_str!("vectors/legacy_json.json");

fn load(text: &str, format: &str) -> Value {
    let doc: Value = serde_json::from_str(text).expect("vector file is valid JSON");
    assert_eq!(doc["format"], format, "wrong vector file");
    doc
}

fn list<'a>(doc: &'a Value, field: &str) -> &'a [Value] {
    doc[field]
        .as_array()
        .unwrap_or_else(|| panic!("`{field}` is an array"))
}

fn name(case: &Value) -> &str {
    case["name"].as_str().expect("case has a name")
}

fn string<'a>(case: &'a Value, field: &str) -> &'a str {
    case[field]
        .as_str()
        .unwrap_or_else(|| panic!("{}: `{field}` is a string", name(case)))
}

fn bytes(case: &Value, field: &str) -> Vec<u8> {
    hex::decode(string(case, field))
        .unwrap_or_else(|e| panic!("{}: `{field}` is hex: {e}", name(case)))
}

fn array<const N: usize>(case: &Value, field: &str) -> [u8; N] {
    bytes(case, field)
        .try_into()
        .unwrap_or_else(|_| panic!("{}: `{field}` has {N} bytes", name(case)))
}

fn number(case: &Value, field: &str) -> u64 {
    case[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: `{field}` is an unsigned integer", name(case)))
}

fn index(case: &Value) -> u32 {
    u32::try_from(number(case, "index")).expect("index fits in u32")
}

fn keys(case: &Value, field: &str) -> SealingKeys {
    let key = SessionKey::from_base64(string(case, field))
        .unwrap_or_else(|e| panic!("{}: bad session key: {e}", name(case)));
    assert_eq!(
        key.to_base64(),
        string(case, field),
        "{}: key re-encodes",
        name(case)
    );
    SealingKeys::derive(&key)
}

fn expected_error(case: &Value) -> CryptoError {
    match string(case, "error") {
        "bad_mac" => CryptoError::BadMac,
        "truncated" => CryptoError::Truncated,
        "unsupported_version" => {
            let payload = bytes(case, "payload_hex");
            CryptoError::UnsupportedVersion(payload[0])
        }
        "hash_mismatch" => CryptoError::HashMismatch,
        "bad_padding" => CryptoError::BadPadding,
        "bad_legacy_json" => CryptoError::BadLegacyJson,
        other => panic!("{}: unknown error name {other:?}", name(case)),
    }
}

/// Checks that the vector's own `mac_input_hex` is consistent with its tag,
/// so other SDKs can rely on it when debugging.
fn check_mac_input(case: &Value, mac_key: &[u8; 32], tag: &[u8]) {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(mac_key).expect("any key length");
    mac.update(&bytes(case, "mac_input_hex"));
    mac.verify_slice(tag)
        .unwrap_or_else(|_| panic!("{}: mac_input_hex does not give the tag", name(case)));
}

#[test]
fn native_v1_vectors() {
    let doc = load(NATIVE_V1, "NATIVE_V1");
    let (mut messages, mut chunks, mut file_ends) = (0, 0, 0);

    for case in list(&doc, "cases") {
        let name = name(case);
        let keys = keys(case, "session_key_b64");
        assert_eq!(
            hex::encode(keys.enc_key()),
            string(case, "enc_key_hex"),
            "{name}: enc key"
        );
        assert_eq!(
            hex::encode(keys.mac_key()),
            string(case, "mac_key_hex"),
            "{name}: mac key"
        );

        let kind = string(case, "kind");
        if kind == "file_end" {
            file_ends += 1;
            let file_id: [u8; 16] = array(case, "id_hex");
            let sha256: [u8; 32] = array(case, "sha256_hex");
            let count = u32::try_from(number(case, "chunk_count")).expect("count fits in u32");
            let expected = bytes(case, "mac_hex");
            let mac = keys.file_end_mac(&file_id, count, &sha256);
            assert_eq!(hex::encode(mac), hex::encode(&expected), "{name}: mac");
            keys.verify_file_end(&file_id, count, &sha256, &expected)
                .unwrap_or_else(|e| panic!("{name}: verify: {e}"));
            check_mac_input(case, keys.mac_key(), &mac);
            continue;
        }

        let id: [u8; 16] = array(case, "id_hex");
        let ctx = MessageContext {
            session: string(case, "session"),
            topic: string(case, "topic"),
            id: &id,
            timestamp_ms: number(case, "timestamp_ms"),
        };
        let iv: [u8; 16] = array(case, "iv_hex");
        let plaintext = bytes(case, "plaintext_hex");
        let expected = bytes(case, "payload_hex");

        let (sealed, opened) = match kind {
            "message" => {
                messages += 1;
                (
                    keys.seal_message_with_iv(&ctx, &plaintext, iv),
                    keys.open_message(&ctx, &expected),
                )
            }
            "chunk" => {
                chunks += 1;
                let index = index(case);
                (
                    keys.seal_chunk_with_iv(&ctx, index, &plaintext, iv),
                    keys.open_chunk(&ctx, index, &expected),
                )
            }
            other => panic!("{name}: unknown kind {other:?}"),
        };
        let sealed = sealed.unwrap_or_else(|e| panic!("{name}: seal: {e}"));
        assert_eq!(
            hex::encode(&sealed),
            hex::encode(&expected),
            "{name}: payload"
        );
        let opened = opened.unwrap_or_else(|e| panic!("{name}: open: {e}"));
        assert_eq!(opened, plaintext, "{name}: plaintext");
        check_mac_input(case, keys.mac_key(), &expected[expected.len() - 32..]);
    }

    assert!(
        messages >= 4 && chunks >= 2 && file_ends >= 1,
        "too few cases: {messages} messages, {chunks} chunks, {file_ends} file ends"
    );
}

#[test]
fn native_v1_invalid_vectors() {
    let doc = load(NATIVE_V1, "NATIVE_V1");
    let invalid = list(&doc, "invalid");
    assert!(!invalid.is_empty(), "no invalid cases");

    for case in invalid {
        let name = name(case);
        let keys = keys(case, "session_key_b64");
        let expected = expected_error(case);
        let id: [u8; 16] = array(case, "id_hex");

        let result = match string(case, "kind") {
            "file_end" => {
                let sha256: [u8; 32] = array(case, "sha256_hex");
                let count = u32::try_from(number(case, "chunk_count")).expect("count fits in u32");
                keys.verify_file_end(&id, count, &sha256, &bytes(case, "mac_hex"))
                    .map(|()| Vec::new())
            }
            kind => {
                let ctx = MessageContext {
                    session: string(case, "session"),
                    topic: string(case, "topic"),
                    id: &id,
                    timestamp_ms: number(case, "timestamp_ms"),
                };
                let payload = bytes(case, "payload_hex");
                match kind {
                    "message" => keys.open_message(&ctx, &payload),
                    "chunk" => keys.open_chunk(&ctx, index(case), &payload),
                    other => panic!("{name}: unknown kind {other:?}"),
                }
            }
        };
        assert_eq!(result, Err(expected), "{name}");
    }
}

#[test]
fn legacy_json_vectors() {
    let doc = load(LEGACY_JSON, "LEGACY_JSON");
    let (mut messages, mut chunks) = (0, 0);

    for case in list(&doc, "cases") {
        let name = name(case);
        let keys = keys(case, "key_b64");
        let iv: [u8; 16] = array(case, "iv_hex");

        match string(case, "kind") {
            "message" => {
                messages += 1;
                let plaintext = string(case, "plaintext");
                let expected = string(case, "json");
                let sealed = keys.seal_legacy_with_iv(plaintext, iv);
                assert_eq!(sealed, expected, "{name}: json text");

                let parsed: Value = serde_json::from_str(&sealed).expect("sealed is JSON");
                assert_eq!(parsed["data"], case["data"], "{name}: data");
                assert_eq!(parsed["hash"], case["hash"], "{name}: hash");

                let opened = keys
                    .open_legacy(expected.as_bytes())
                    .unwrap_or_else(|e| panic!("{name}: open: {e}"));
                assert_eq!(opened, plaintext, "{name}: plaintext");
            }
            "chunk" => {
                chunks += 1;
                let plaintext = bytes(case, "plaintext_hex");
                let expected = bytes(case, "sealed_hex");
                let sealed = keys.seal_legacy_chunk_with_iv(&plaintext, iv);
                assert_eq!(
                    hex::encode(&sealed),
                    hex::encode(&expected),
                    "{name}: sealed"
                );
                let opened = keys
                    .open_legacy_chunk(&expected)
                    .unwrap_or_else(|e| panic!("{name}: open: {e}"));
                assert_eq!(opened, plaintext, "{name}: plaintext");
            }
            other => panic!("{name}: unknown kind {other:?}"),
        }
    }

    assert!(
        messages >= 2 && chunks >= 1,
        "too few cases: {messages} messages, {chunks} chunks"
    );
}

#[test]
fn legacy_json_invalid_vectors() {
    let doc = load(LEGACY_JSON, "LEGACY_JSON");
    let invalid = list(&doc, "invalid");
    assert!(!invalid.is_empty(), "no invalid cases");

    for case in invalid {
        let keys = keys(case, "key_b64");
        let result = keys.open_legacy(string(case, "json").as_bytes());
        assert_eq!(result, Err(expected_error(case)), "{}", name(case));
    }
}
