//! The broker's certificates as clients meet them (design §10): the generated one
//! covers the addresses clients dial, and a real one (`--cert/--key`) is served on QUIC
//! and also speaks HTTPS/WSS on the TCP port.

mod common;

use std::sync::Arc;

use common::{Broker, within};
use fastport::client::{Client, ClientConfig, SessionKey};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and a leaf for 127.0.0.1 signed by it, as PEM files in `dir`.
fn certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");
    let (cert, key, ca_file) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca.pem())).expect("write");
    std::fs::write(&key, leaf_key.serialize_pem()).expect("write");
    std::fs::write(&ca_file, ca.pem()).expect("write");
    (cert, key, ca_file)
}

#[tokio::test]
async fn a_real_certificate_serves_https_wss_and_quic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, ca) = certificates(dir.path());
    let broker = Broker::start_with(&[
        "--cert",
        cert.to_str().expect("utf-8"),
        "--key",
        key.to_str().expect("utf-8"),
    ]);

    // HTTPS, with a raw TLS client that trusts only the test CA.
    let response = https(
        &broker,
        &ca,
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"status\":\"ok\""));
    let body = r#"{"sessionName":"tls","password":"secret-pass"}"#;
    let request = format!(
        "POST /api/createSession HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = https(&broker, &ca, &request).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // The CLI over HTTPS, given the WSS URL and the CA; without the CA it does not
    // trust the broker.
    let create = |ca: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fastport"));
        cmd.args(["session", "create", "--session", "tls-cli"])
            .args(["--password", "secret-pass", "--url"])
            .arg(format!("wss://{}/v1/ws", broker.http))
            .env_remove("FASTPORT_URL")
            .env_remove("FASTPORT_CA");
        if let Some(ca) = ca {
            cmd.arg("--ca").arg(ca);
        }
        cmd.output().expect("run")
    };
    let untrusted = create(None);
    let refused = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        !untrusted.status.success() && refused.contains("UnknownIssuer"),
        "{refused}"
    );
    let created = create(Some(&ca));
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    // WSS and QUIC, both verified against the same CA.
    let key = SessionKey::generate();
    let wss = ClientConfig::new(
        format!("wss://{}/v1/ws", broker.http),
        "tls-cli",
        "secret-pass",
        key.clone(),
    )
    .ca_file(&ca);
    let over_wss = within("wss connect", Client::connect(wss))
        .await
        .expect("wss");
    let quic = ClientConfig::new(broker.quic_url(), "tls-cli", "secret-pass", key).ca_file(&ca);
    let over_quic = within("quic connect", Client::connect(quic))
        .await
        .expect("quic");
    let mut sub = over_quic.subscribe("t").await.expect("subscribe");
    over_wss
        .publish("t", b"over wss".to_vec())
        .await
        .expect("publish");
    assert_eq!(
        within("delivery", sub.next())
            .await
            .expect("message")
            .payload,
        &b"over wss"[..]
    );
}

/// Sends one HTTP/1.1 request over TLS (trusting only `ca`) and returns the response.
async fn https(broker: &Broker, ca: &std::path::Path, request: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("ca"))
        .expect("root");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(broker.http)
        .await
        .expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut stream = within("TLS handshake", connector.connect(name, tcp))
        .await
        .expect("handshake");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = String::new();
    within("response", stream.read_to_string(&mut response))
        .await
        .ok();
    response
}

/// A broker listening on every interface is dialled by this machine's own address, as
/// another machine would dial it, and its generated certificate covers that address:
/// the SDK checks it against the CA the broker made (`--ca certs/ca.pem`).
#[tokio::test]
async fn a_broker_on_every_interface_is_dialled_by_this_machine_s_address() {
    let ip = if_addrs::get_if_addrs()
        .expect("list interfaces")
        .iter()
        .map(|i| i.ip())
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .expect("this test needs a non-loopback IPv4 address on this machine");
    let broker = Broker::start_on(std::net::Ipv4Addr::UNSPECIFIED.into(), &[]);
    let names = broker
        .banner
        .iter()
        .find(|l| l.trim().starts_with("names "))
        .expect("the banner names what the certificate covers");
    assert!(names.contains(&ip.to_string()), "{names}");

    broker
        .create_session("wide", "pw", serde_json::json!({}))
        .await;
    let key = SessionKey::generate();
    let url = format!("quic://{ip}:{}", broker.quic.port());
    let config = ClientConfig::new(url, "wide", "pw", key).ca_file(broker.ca());
    // Over QUIC: the fallback, WSS, finds plain HTTP on this broker and fails too.
    within("connect by this machine's address", Client::connect(config))
        .await
        .expect("the certificate covers the address dialled");
}
