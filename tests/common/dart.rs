//! An independent client for the legacy bridge: it speaks only the seed's JSON and
//! binary frames, with its own AES code (nothing from fastPort's SDK), the way the
//! fastPort 2.0 Dart client does.

use std::time::Duration;

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::{Broker, WAIT, now_ms, within};

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The Dart client's message encryption, written from the seed's description.
pub fn dart_encrypt(key: &[u8; 32], plaintext: &str) -> (String, String) {
    let iv: [u8; 16] = rand::random();
    let ct = cbc::Encryptor::<aes::Aes256>::new(key.into(), &iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(plaintext.as_bytes());
    let data = B64.encode([&iv[..], &ct].concat());
    (data, hex::encode(Sha256::digest(plaintext.as_bytes())))
}

pub fn dart_decrypt(key: &[u8; 32], data: &str, hash: &str) -> String {
    let raw = B64.decode(data).expect("base64");
    let (iv, ct) = raw.split_at(16);
    let pt = cbc::Decryptor::<aes::Aes256>::new(key.into(), iv.into())
        .decrypt_padded_vec_mut::<Pkcs7>(ct)
        .expect("decrypts");
    assert_eq!(hex::encode(Sha256::digest(&pt)), hash, "hash matches");
    String::from_utf8(pt).expect("utf-8")
}

/// The text of a `{"type":"message"}` frame, opened as the Dart client opens it.
pub fn dart_open(key: &[u8; 32], message: &Value) -> String {
    dart_decrypt(
        key,
        message["data"].as_str().expect("data"),
        message["hash"].as_str().expect("hash"),
    )
}

pub struct Dart {
    pub ws: Ws,
}

impl Dart {
    pub async fn connect(broker: &Broker, path: &str) -> Dart {
        // From the root the broker's banner prints for legacy clients.
        let url = format!(
            "{}{}",
            broker.banner_url("legacy"),
            path.trim_start_matches('/')
        );
        let (ws, _) = within("ws connect", tokio_tungstenite::connect_async(url))
            .await
            .expect("connect");
        Dart { ws }
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }

    /// The next JSON frame; `None` on close or after `wait` of silence.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Some(serde_json::from_str(&t).expect("JSON from broker"));
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                _ => return None,
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        self.recv_within(WAIT)
            .await
            .expect("a frame from the broker")
    }

    pub async fn init(&mut self, session: &str, password: &str, user_id: Option<&str>) -> Value {
        let mut frame = json!({"type": "init", "sessionName": session, "password": password});
        if let Some(u) = user_id {
            frame["userId"] = json!(u);
        }
        self.send(frame).await;
        self.recv().await
    }

    pub async fn publish(&mut self, key: &[u8; 32], topic: &str, text: &str) -> String {
        let (data, hash) = dart_encrypt(key, text);
        let id = uuid::Uuid::new_v4().to_string();
        self.send(json!({
            "type": "publish", "topic": topic, "data": data, "hash": hash,
            "timestamp": now_ms(), "messageId": id,
        }))
        .await;
        id
    }

    /// Waits for the close frame and returns its code.
    pub async fn close_code(&mut self) -> Option<CloseCode> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }
}

/// The Dart client's file chunk encryption: IV ‖ AES-256-CBC(chunk) with the raw key.
pub fn dart_encrypt_chunk(key: &[u8; 32], chunk: &[u8]) -> Vec<u8> {
    let iv: [u8; 16] = rand::random();
    let ct = cbc::Encryptor::<aes::Aes256>::new(key.into(), &iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(chunk);
    [&iv[..], &ct].concat()
}

pub fn dart_decrypt_chunk(key: &[u8; 32], sealed: &[u8]) -> Vec<u8> {
    let (iv, ct) = sealed.split_at(16);
    cbc::Decryptor::<aes::Aes256>::new(key.into(), iv.into())
        .decrypt_padded_vec_mut::<Pkcs7>(ct)
        .expect("chunk decrypts")
}

impl Dart {
    /// Sends a file the seed's way: `init_file`, binary chunks, `end_file`.
    pub async fn send_file(
        &mut self,
        key: &[u8; 32],
        topic: &str,
        name: &str,
        data: &[u8],
        chunk: usize,
    ) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let chunks: Vec<&[u8]> = data.chunks(chunk).collect();
        self.send(json!({
            "type": "init_file", "fileId": id, "fileName": name, "fileSize": data.len(),
            "totalChunks": chunks.len(), "topic": topic,
        }))
        .await;
        for (i, part) in chunks.iter().enumerate() {
            let mut frame = vec![0x02];
            frame.extend_from_slice(id.as_bytes());
            frame.extend_from_slice(&(i as u32).to_be_bytes());
            frame.extend_from_slice(&dart_encrypt_chunk(key, part));
            self.ws
                .send(Message::binary(frame))
                .await
                .expect("send chunk");
        }
        self.send(json!({
            "type": "end_file", "fileId": id, "hash": hex::encode(Sha256::digest(data)), "topic": topic,
        }))
        .await;
        id
    }

    /// Receives one file the seed's way; returns (init_file frame, plaintext).
    pub async fn receive_file(&mut self, key: &[u8; 32]) -> (Value, Vec<u8>) {
        let init = self.recv().await;
        assert_eq!(init["type"], "init_file", "{init}");
        let id = init["fileId"].as_str().expect("fileId").to_owned();
        let mut data = Vec::new();
        let mut next = 0u32;
        loop {
            match within("file frame", self.ws.next()).await {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(b[0], 0x02);
                    assert_eq!(&b[1..37], id.as_bytes());
                    assert_eq!(u32::from_be_bytes([b[37], b[38], b[39], b[40]]), next);
                    data.extend_from_slice(&dart_decrypt_chunk(key, &b[41..]));
                    next += 1;
                }
                Some(Ok(Message::Text(t))) => {
                    let end: Value = serde_json::from_str(&t).expect("json");
                    assert_eq!(end["type"], "end_file", "{end}");
                    assert_eq!(end["fileId"], id.as_str());
                    assert_eq!(
                        end["hash"],
                        hex::encode(Sha256::digest(&data)),
                        "hash of the file"
                    );
                    return (init, data);
                }
                Some(Ok(_)) => continue,
                other => panic!("file stream broke: {other:?}"),
            }
        }
    }
}

/// The key as the Dart client holds it (base64).
pub fn key_b64(key: &[u8; 32]) -> String {
    B64.encode(key)
}
