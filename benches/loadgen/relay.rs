//! The ceiling for a file fan-out: a bare quinn relay that reads the sender's stream
//! and writes every chunk to two receiver streams, with no broker logic at all. It
//! runs as a separate process (this binary with `--relay-server`), and its clients do
//! the same end-to-end work as fastPort's SDK, so that the comparison isolates the
//! broker: the sender seals each 64 KiB chunk as `NATIVE_V1` and hashes the whole file
//! (SHA-256, sent after the last chunk as fastPort's `FileEnd` carries it), the
//! receivers open and check every chunk and check the file's hash.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use fastport::client::SessionKey;
use fastport::client::crypto::{MessageContext, SealingKeys};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

const ALPN: &[u8] = b"relay";
const CHUNK: usize = 64 * 1024;
/// Length prefix of the trailer frame that carries the file's SHA-256.
const TRAILER: u32 = u32::MAX;

/// A self-signed certificate for "localhost", written as DER files.
pub fn make_cert(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let cert = dir.join("relay.der");
    let key = dir.join("relay.key.der");
    std::fs::write(&cert, certified.cert.der())?;
    std::fs::write(&key, certified.key_pair.serialize_der())?;
    Ok((cert, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The relay process: two receivers, then one sender; every chunk to both.
pub async fn serve(port: u16, cert: &Path, key: &Path) -> Result<()> {
    let cert = CertificateDer::from(std::fs::read(cert)?);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(std::fs::read(key)?));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let endpoint = quinn::Endpoint::server(config, SocketAddr::from(([127, 0, 0, 1], port)))?;
    println!("ready");
    loop {
        let mut receivers = Vec::new();
        let mut sender = None;
        let mut connections = Vec::new();
        while receivers.len() < 2 || sender.is_none() {
            let conn = endpoint.accept().await.context("endpoint closed")?.await?;
            let (send, mut recv) = conn.accept_bi().await?;
            let mut role = [0u8; 1];
            recv.read_exact(&mut role).await?;
            if role[0] == b'R' {
                receivers.push(send);
            } else {
                sender = Some(recv);
            }
            connections.push(conn);
        }
        let Some(mut from) = sender else { continue };
        while let Some(chunk) = from.read_chunk(CHUNK * 2, true).await? {
            for to in &mut receivers {
                to.write_chunk(chunk.bytes.clone()).await?;
            }
        }
        for mut to in receivers {
            to.finish()?;
            let _ = to.stopped().await;
        }
        drop(connections);
    }
}

async fn connect(
    port: u16,
    cert: &Path,
    role: u8,
) -> Result<(quinn::Endpoint, quinn::SendStream, quinn::RecvStream)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(std::fs::read(cert)?))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls)?,
    )));
    let conn = endpoint
        .connect(SocketAddr::from(([127, 0, 0, 1], port)), "localhost")?
        .await?;
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(&[role]).await?;
    Ok((endpoint, send, recv))
}

/// Sends `size` bytes through the relay to two receivers; returns the elapsed seconds.
pub async fn transfer(port: u16, cert: &Path, size: u64) -> Result<f64> {
    let keys = SealingKeys::derive(&SessionKey::generate());
    let file_id = [5u8; 16];
    let ctx = |ts| (keys.clone(), file_id, ts);
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (endpoint, send, mut recv) = connect(port, cert, b'R').await?;
        let (keys, id, ts) = ctx(1);
        readers.push(tokio::spawn(async move {
            let _keep = (endpoint, send);
            let mut received = 0u64;
            let mut buf = bytes::BytesMut::new();
            let mut index = 0u32;
            let mut hasher = Sha256::new();
            let mut checked = false;
            loop {
                while buf.len() >= 4 {
                    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    if len == TRAILER {
                        if buf.len() < 4 + 32 {
                            break;
                        }
                        let expected = buf.split_to(4 + 32).split_off(4);
                        let actual = std::mem::take(&mut hasher).finalize();
                        if expected[..] != actual[..] {
                            return Err(anyhow!("the file's SHA-256 does not match"));
                        }
                        checked = true;
                        continue;
                    }
                    let len = len as usize;
                    if buf.len() < 4 + len {
                        break;
                    }
                    let sealed = buf.split_to(4 + len).split_off(4);
                    let context = MessageContext {
                        session: "relay",
                        topic: "files",
                        id: &id,
                        timestamp_ms: ts,
                    };
                    let plain = keys
                        .open_chunk(&context, index, &sealed)
                        .map_err(|e| anyhow!("{e}"))?;
                    hasher.update(&plain);
                    received += plain.len() as u64;
                    index += 1;
                }
                match recv.read_chunk(CHUNK * 2, true).await? {
                    Some(chunk) => buf.extend_from_slice(&chunk.bytes),
                    None if checked => return anyhow::Ok(received),
                    None => return Err(anyhow!("the stream ended without the file's hash")),
                }
            }
        }));
    }
    let (endpoint, mut send, _recv) = connect(port, cert, b'S').await?;
    let start = Instant::now();
    let (keys, id, ts) = ctx(1);
    let plain = vec![7u8; CHUNK];
    let mut sent = 0u64;
    let mut index = 0u32;
    let mut hasher = Sha256::new();
    while sent < size {
        let n = (size - sent).min(CHUNK as u64) as usize;
        let context = MessageContext {
            session: "relay",
            topic: "files",
            id: &id,
            timestamp_ms: ts,
        };
        hasher.update(&plain[..n]);
        let sealed = keys
            .seal_chunk(&context, index, &plain[..n])
            .map_err(|e| anyhow!("{e}"))?;
        let mut framed = Vec::with_capacity(4 + sealed.len());
        framed.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
        framed.extend_from_slice(&sealed);
        send.write_chunk(Bytes::from(framed)).await?;
        sent += n as u64;
        index += 1;
    }
    let mut trailer = TRAILER.to_be_bytes().to_vec();
    trailer.extend_from_slice(&hasher.finalize());
    send.write_chunk(Bytes::from(trailer)).await?;
    send.finish()?;
    for reader in readers {
        let got = reader.await??;
        if got != size {
            return Err(anyhow!("a receiver got {got} of {size} bytes"));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = send.shutdown().await;
    drop(endpoint);
    Ok(elapsed)
}
