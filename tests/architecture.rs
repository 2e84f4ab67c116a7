//! Rules of the code base that the compiler does not check: the broker never touches
//! end-to-end crypto, the core does no I/O, and the wire contract is documented.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Lines of code (comments stripped) that mention `needle` as a path segment start.
fn uses(text: &str, needle: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .filter(|code| {
            code.match_indices(needle).any(|(i, _)| {
                let before = code[..i].chars().last();
                // `ring::hmac::…` is quinn's transport crypto, not the SDK's crates.
                let ring = code[..i].ends_with("ring::");
                !ring && !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            })
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn only_the_sdk_uses_the_end_to_end_crypto_crates() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let sdk = src().join("client");
    let mut offenders = Vec::new();
    for file in files.iter().filter(|f| !f.starts_with(&sdk)) {
        let text = std::fs::read_to_string(file).expect("read");
        for krate in ["aes::", "cbc::", "hmac::", "hkdf::"] {
            for line in uses(&text, krate) {
                offenders.push(format!("{}: {}", file.display(), line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "server code uses E2E crypto crates:\n{}",
        offenders.join("\n")
    );

    // And the SDK does use them, so this test is looking at the right thing.
    let crypto = std::fs::read_to_string(sdk.join("crypto.rs")).expect("read");
    assert!(!uses(&crypto, "hmac::").is_empty() || crypto.contains("use hmac"));
}

#[test]
fn the_core_does_no_io() {
    let mut files = Vec::new();
    rust_files(&src().join("core"), &mut files);
    assert!(files.len() >= 5, "expected the core's modules");
    let mut offenders = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        // Test modules may use anything; they are not the core.
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or("")
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        for banned in [
            "tokio",
            "sqlx",
            "quinn",
            "axum",
            "rustls",
            "tungstenite",
            "SystemTime",
            "Instant::now",
        ] {
            if code.contains(banned) && !file.ends_with("tests.rs") {
                offenders.push(format!("{} mentions {banned}", file.display()));
            }
        }
    }
    assert!(offenders.is_empty(), "{}", offenders.join("\n"));
}

/// Design §3: `proto/fastport.proto` is the contract independent SDKs are generated
/// from, "every message and field commented".
#[test]
fn every_proto_message_field_and_enum_value_is_commented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/fastport.proto");
    let text = std::fs::read_to_string(path).expect("read the proto");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut bare = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let declares = line.starts_with("message ") || line.starts_with("enum ");
        let field = line.ends_with(';') && line.contains(" = ") && !line.starts_with("syntax");
        let commented = i > 0 && lines[i - 1].starts_with("//");
        if (declares || field) && !commented {
            bare.push(format!("line {}: {line}", i + 1));
        }
    }
    assert!(bare.is_empty(), "not commented:\n{}", bare.join("\n"));
}
