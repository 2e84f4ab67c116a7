//! The legacy JSON bridge: fastPort 2.0's WebSocket protocol (seed "WebSocket
//! Protocol", design §6 and §10), so the seeds' Dart clients work unchanged but for the
//! URL. It is one more adapter into the same core: JSON text frames become the same
//! [`Request`]s the native carriers produce, and core events are written back as JSON.
//!
//! Mapping (design §10): `messageId`/`fileId` are UUID text ↔ 16-byte ids; `timestamp`
//! is Unix milliseconds; a legacy message travels natively as `format = LEGACY_JSON`
//! with `payload` = the UTF-8 JSON `{"data":…,"hash":…}` as sent; an `init` with a
//! `userId` makes that id the client id and the client's subscriptions durable.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::core::{
    ClientId, Event, MessageId, Publish, Reject, SessionName, TopicFilter, TopicName,
};
use crate::proto::PayloadFormat;

use crate::driver::now_ms;

use super::files::{FileItem, FileMeta};
use super::request::{HelloRequest, PROTOCOL_VERSION, PushTokenFields, PushTokenRequest, Refused};
use super::uploads::OpenUploads;
use super::websocket::{self, Encoder};
use super::{Link, LinkContext, Outbound, Request};

/// Serves one legacy WebSocket connection.
pub async fn serve(socket: WebSocket, peer: SocketAddr, ctx: Arc<LinkContext>) {
    let (mut connection, mut link) = websocket::Connection::open(
        socket,
        peer.ip(),
        ctx,
        true,
        LegacyEncoder::default(),
        "init",
    );

    let mut reader = Reader::default();
    let mut uploads = OpenUploads::new(uuid_text);
    while let Some(message) = connection.next(&link).await {
        if !uploads.is_empty() {
            // Boxed, as the file frames below: rare paths that would otherwise make
            // every connection's reader task larger.
            Box::pin(uploads.drop_idle(&link)).await;
        }
        let parsed = match message {
            Message::Text(text) => reader.parse(text.as_str()),
            Message::Binary(bytes) => parse_chunk(bytes),
            _ => continue, // pings and pongs only count as activity
        };
        let outcome = match parsed {
            Ok(LegacyIn::Request(request)) => link.handle(request).await,
            Ok(LegacyIn::BadInit(reject)) if !link.is_attached() => {
                link.fail(reject).await;
                break;
            }
            Ok(LegacyIn::Undecodable(reject)) => {
                if !link.is_attached() {
                    // Closing before login answers with the failed `init_response` the
                    // seed's client waits for; the error itself comes first.
                    link.refuse(Refused::new(reject.clone())).await;
                }
                link.fail(reject).await;
                break;
            }
            Ok(LegacyIn::BadInit(_)) => {
                // As a well-formed second init is answered.
                let reject = Reject::InvalidFrame("already authenticated".into());
                link.refuse(Refused::new(reject)).await;
                Ok(())
            }
            Ok(LegacyIn::File(file)) => {
                if let Err(refused) = Box::pin(files(&mut link, &mut uploads, file)).await {
                    link.refuse(refused).await;
                }
                Ok(())
            }
            Err(refused) => {
                link.refuse(refused).await;
                Ok(())
            }
        };
        if outcome.is_err() {
            link.fail(Reject::Internal("the broker is shutting down"))
                .await;
            break;
        }
    }
    // Uploads cut short give their ids back before the close's linger.
    drop(uploads);
    connection.close(link).await;
}

/// Parses the client's JSON frames.
#[derive(Default)]
struct Reader {
    /// Whether the connection's first `init` carried a `userId`, making its
    /// subscriptions durable. A later `init` is refused and changes nothing.
    identified: Option<bool>,
}

fn invalid(why: impl Into<String>) -> Refused {
    Refused::new(Reject::InvalidFrame(why.into()))
}

/// The fields of a frame the bridge reads, each kept as its JSON text until it is
/// read. Other fields are skipped unbuilt, so a frame never takes more memory than
/// its text: a `Value` tree of `{"x":[0,0,…]}` would take 16 times as much.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Frame<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    session_name: Option<&'a RawValue>,
    #[serde(borrow)]
    password: Option<&'a RawValue>,
    #[serde(borrow)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow)]
    topic: Option<&'a RawValue>,
    #[serde(borrow)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    hash: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    fcm_token: Option<&'a RawValue>,
    #[serde(borrow)]
    device_id: Option<&'a RawValue>,
    #[serde(borrow)]
    platform: Option<&'a RawValue>,
    #[serde(borrow)]
    file_id: Option<&'a RawValue>,
    #[serde(borrow)]
    file_name: Option<&'a RawValue>,
    #[serde(borrow)]
    file_size: Option<&'a RawValue>,
    #[serde(borrow)]
    total_chunks: Option<&'a RawValue>,
}

impl<'a> Frame<'a> {
    /// The field named `field` as sent, if it was (`null` counts as absent).
    fn get(&self, field: &str) -> Option<&'a RawValue> {
        let raw = match field {
            "type" => self.kind,
            "sessionName" => self.session_name,
            "password" => self.password,
            "userId" => self.user_id,
            "topic" => self.topic,
            "messageId" => self.message_id,
            "data" => self.data,
            "hash" => self.hash,
            "timestamp" => self.timestamp,
            "fcmToken" => self.fcm_token,
            "deviceId" => self.device_id,
            "platform" => self.platform,
            "fileId" => self.file_id,
            "fileName" => self.file_name,
            "fileSize" => self.file_size,
            "totalChunks" => self.total_chunks,
            _ => None,
        };
        raw.filter(|raw| raw.get() != "null")
    }

    /// A non-negative integer field (as `Value::as_u64` reads one).
    fn number(&self, field: &str) -> Option<u64> {
        self.get(field)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }
}

fn string<'a>(frame: &Frame<'a>, kind: &str, field: &str) -> Result<Cow<'a, str>, Refused> {
    optional_string(frame, kind, field)?
        .ok_or_else(|| invalid(format!("{kind}: {field} is required")))
}

fn optional_string<'a>(
    frame: &Frame<'a>,
    kind: &str,
    field: &str,
) -> Result<Option<Cow<'a, str>>, Refused> {
    let Some(raw) = frame.get(field) else {
        return Ok(None);
    };
    // Borrowed unless the text has escapes.
    serde_json::from_str::<&'a str>(raw.get())
        .map(Cow::Borrowed)
        .or_else(|_| serde_json::from_str::<String>(raw.get()).map(Cow::Owned))
        .map(Some)
        .map_err(|_| invalid(format!("{kind}: {field} must be a string")))
}

/// A legacy UUID id as a 16-byte id.
pub fn parse_uuid(kind: &str, field: &str, text: &str) -> Result<MessageId, Refused> {
    // Only the 36-character hyphenated form, the one binary chunks carry (design §10:
    // "UUID text … anything else: INVALID_FRAME"); `Uuid::parse_str` alone would
    // take the simple, braced and URN forms too.
    let refused = || {
        invalid(format!(
            "{kind}: {field} must be a UUID (8-4-4-4-12 hex digits)"
        ))
    };
    if text.len() != 36 {
        return Err(refused());
    }
    Uuid::parse_str(text)
        .map(|u| MessageId(*u.as_bytes()))
        .map_err(|_| refused())
}

/// A 16-byte id as legacy UUID text.
pub fn uuid_text(id: &MessageId) -> String {
    Uuid::from_bytes(*id.as_bytes()).hyphenated().to_string()
}

/// What one legacy frame asks for.
enum LegacyIn {
    Request(Request),
    /// An `init` that could not be read. Before login it fails the login (a failed
    /// `init_response` and a close), as the seed's client waits for that answer.
    BadInit(Reject),
    /// Bytes that are not a frame at all (not a JSON object, a binary message that is
    /// not a file chunk): `INVALID_FRAME`, and the connection closes, as on every
    /// carrier (design §10). A frame whose fields are wrong is refused, and it lives on.
    Undecodable(Reject),
    File(FileFrame),
}

/// A frame of a legacy file transfer.
enum FileFrame {
    InitFile(FileMeta),
    Chunk {
        file_id: MessageId,
        index: u32,
        payload: Bytes,
    },
    EndFile {
        file_id: MessageId,
        sha256: Bytes,
    },
}

/// Handles the file frames of a legacy connection.
async fn files(
    link: &mut Link,
    uploads: &mut OpenUploads,
    frame: FileFrame,
) -> Result<(), Refused> {
    match frame {
        FileFrame::InitFile(meta) => uploads.open(link, meta).await,
        FileFrame::Chunk {
            file_id,
            index,
            payload,
        } => {
            attached(link, file_id)?;
            uploads.chunk(file_id, index, payload).await
        }
        FileFrame::EndFile { file_id, sha256 } => {
            attached(link, file_id)?;
            uploads.finish(link, file_id, sha256, Bytes::new()).await
        }
    }
}

/// Refuses a file frame before `init`.
fn attached(link: &Link, file_id: MessageId) -> Result<(), Refused> {
    match link.is_attached() {
        true => Ok(()),
        false => Err(Refused::for_message(file_id)(Reject::NotAuthenticated)),
    }
}

/// A binary chunk: `[0x02][36-byte fileId][4-byte big-endian index][payload]`.
fn parse_chunk(bytes: Bytes) -> Result<LegacyIn, Refused> {
    const HEADER: usize = 1 + 36 + 4;
    if bytes.len() < HEADER || bytes[0] != 0x02 {
        return Ok(LegacyIn::Undecodable(Reject::InvalidFrame(
            "binary frames are file chunks: [0x02][36-byte fileId][4-byte index][payload]".into(),
        )));
    }
    let id =
        std::str::from_utf8(&bytes[1..37]).map_err(|_| invalid("chunk: fileId must be a UUID"))?;
    let file_id = parse_uuid("chunk", "fileId", id)?;
    let index = u32::from_be_bytes([bytes[37], bytes[38], bytes[39], bytes[40]]);
    Ok(LegacyIn::File(FileFrame::Chunk {
        file_id,
        index,
        payload: bytes.slice(HEADER..),
    }))
}

impl Reader {
    fn init(&mut self, frame: &Frame<'_>) -> Result<Request, Refused> {
        let kind = "init";
        // No session can have a name that does not parse: that is a failed login, as
        // for an unknown session (close code 1008, and nothing told about names).
        let session = SessionName::parse(&string(frame, kind, "sessionName")?)
            .map_err(|_| Refused::new(Reject::BadCredentials))?;
        // No password is that long either (createSession takes 1,024 bytes at most).
        let password = string(frame, kind, "password")?;
        if password.len() > super::request::MAX_TEXT {
            return Err(Refused::new(Reject::BadCredentials));
        }
        let password = password.into_owned();
        let client_id = optional_string(frame, kind, "userId")?
            .filter(|u| !u.is_empty())
            .map(|u| ClientId::parse(&u))
            .transpose()
            .map_err(|e| invalid(format!("init: userId: {e}")))?;
        self.identified.get_or_insert(client_id.is_some());
        Ok(Request::Hello(HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            session,
            password,
            client_id,
            clean: false,
        }))
    }

    fn parse(&mut self, text: &str) -> Result<LegacyIn, Refused> {
        let not_a_frame = |why: String| Ok(LegacyIn::Undecodable(Reject::InvalidFrame(why)));
        // A struct also reads a JSON array, field by field: only objects are frames.
        if !text.trim_start().starts_with('{') {
            return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => not_a_frame("expected a JSON object".into()),
                Err(e) => not_a_frame(format!("invalid JSON: {e}")),
            };
        }
        let frame: Frame<'_> = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(e) if e.is_data() => {
                return not_a_frame(format!("expected a JSON object of a frame's fields: {e}"));
            }
            Err(e) => return not_a_frame(format!("invalid JSON: {e}")),
        };
        let kind = string(&frame, "frame", "type")?;
        let kind = &*kind;
        match kind {
            // A malformed init is the init's answer (see `LegacyIn::BadInit`).
            "init" => Ok(match self.init(&frame) {
                Ok(hello) => LegacyIn::Request(hello),
                Err(refused) => LegacyIn::BadInit(refused.reject),
            }),
            "subscribe" | "unsubscribe" => {
                let filter = TopicFilter::parse(&string(&frame, kind, "topic")?)
                    .map_err(|e| invalid(format!("{kind}: topic: {e}")))?;
                Ok(LegacyIn::Request(if kind == "subscribe" {
                    Request::Subscribe {
                        request_id: 0,
                        filter,
                        durable: self.identified.unwrap_or(false),
                        history: 0,
                        presence: false,
                    }
                } else {
                    Request::Unsubscribe {
                        request_id: 0,
                        filter,
                    }
                }))
            }
            "publish" => {
                let message_id =
                    parse_uuid(kind, "messageId", &string(&frame, kind, "messageId")?)?;
                let refused = |why: String| Refused {
                    reject: Reject::InvalidFrame(why),
                    request_id: 0,
                    message_id: Some(message_id),
                };
                let topic = TopicName::parse(&string(&frame, kind, "topic")?)
                    .map_err(|e| refused(format!("publish: topic: {e}")))?;
                let data = string(&frame, kind, "data")?;
                let hash = string(&frame, kind, "hash")?;
                let timestamp_ms = frame.number("timestamp").ok_or_else(|| {
                    refused("publish: timestamp must be Unix milliseconds".into())
                })?;
                let payload = json!({"data": data, "hash": hash}).to_string();
                Ok(LegacyIn::Request(Request::Publish(Publish {
                    message_id,
                    topic,
                    payload: Bytes::from(payload),
                    timestamp_ms,
                    format: PayloadFormat::LegacyJson,
                })))
            }
            "ack" => Ok(LegacyIn::Request(Request::Ack(parse_uuid(
                kind,
                "messageId",
                &string(&frame, kind, "messageId")?,
            )?))),
            "register_fcm_token" => PushTokenRequest::new(
                0,
                &PushTokenFields::LEGACY,
                string(&frame, kind, "userId")?.into_owned(),
                string(&frame, kind, "fcmToken")?.into_owned(),
                optional_string(&frame, kind, "deviceId")?
                    .unwrap_or_default()
                    .into_owned(),
                optional_string(&frame, kind, "platform")?
                    .unwrap_or_default()
                    .into_owned(),
            )
            .map(|r| LegacyIn::Request(Request::RegisterPushToken(r)))
            .map_err(Refused::new),
            "init_file" => {
                let file_id = parse_uuid(kind, "fileId", &string(&frame, kind, "fileId")?)?;
                let refused = |why: String| Refused {
                    reject: Reject::InvalidFrame(why),
                    request_id: 0,
                    message_id: Some(file_id),
                };
                let topic = TopicName::parse(&string(&frame, kind, "topic")?)
                    .map_err(|e| refused(format!("init_file: topic: {e}")))?;
                let name = string(&frame, kind, "fileName")?;
                if name.len() > FileMeta::MAX_NAME {
                    return Err(refused(format!("init_file: {}", FileMeta::name_too_long())));
                }
                let size = frame.number("fileSize").ok_or_else(|| {
                    refused("init_file: fileSize must be a number of bytes".into())
                })?;
                let chunk_count = match frame.get("totalChunks") {
                    None => 0,
                    Some(_) => frame
                        .number("totalChunks")
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| refused("init_file: totalChunks must be a count".into()))?,
                };
                let timestamp_ms = frame.number("timestamp").unwrap_or_else(now_ms);
                Ok(LegacyIn::File(FileFrame::InitFile(FileMeta {
                    file_id,
                    topic,
                    name: Bytes::copy_from_slice(name.as_bytes()),
                    size,
                    chunk_size: 0,
                    chunk_count,
                    timestamp_ms,
                    format: PayloadFormat::LegacyJson,
                })))
            }
            "end_file" => {
                let file_id = parse_uuid(kind, "fileId", &string(&frame, kind, "fileId")?)?;
                let hash = optional_string(&frame, kind, "hash")?.unwrap_or_default();
                let sha256 = hash_bytes(&hash);
                Ok(LegacyIn::File(FileFrame::EndFile { file_id, sha256 }))
            }
            other => Err(invalid(format!("unknown type {other:?}"))),
        }
    }
}

/// The seed's `end_file.hash` ("sha256_of_file": 64 hex digits) as the 32-byte
/// digest native receivers check. Any other text is carried as its own bytes, so
/// that legacy receivers get it back as it was sent ([`hash_text`]).
fn hash_bytes(text: &str) -> Bytes {
    let mut digest = [0u8; 32];
    match hex::decode_to_slice(text, &mut digest) {
        Ok(()) => Bytes::copy_from_slice(&digest),
        Err(_) => Bytes::copy_from_slice(text.as_bytes()),
    }
}

/// A file trailer's hash as legacy `end_file.hash` text: a digest (from a native
/// sender, or [`hash_bytes`]) in lowercase hex, text carried as is. A 32-byte digest
/// is told from 32 bytes of text by not being UTF-8 free of control characters, as
/// all but about one in 10^11 digests are not.
fn hash_text(hash: &[u8]) -> String {
    match std::str::from_utf8(hash) {
        Ok(text) if hash.len() != 32 || !text.chars().any(char::is_control) => text.to_owned(),
        _ => hex::encode(hash),
    }
}

/// Writes core events as the seed's JSON frames.
#[derive(Default)]
struct LegacyEncoder {
    /// `init_response` was sent: refusals are `error` frames from now on.
    welcomed: bool,
    /// Topics of the files being forwarded (`end_file` names it again).
    file_topics: HashMap<MessageId, String>,
}

fn text(value: Value) -> Message {
    Message::Text(value.to_string().into())
}

fn error_frame(reject: &Reject, message_id: Option<&MessageId>) -> Value {
    let mut frame = json!({
        "type": "error",
        "code": reject.code().as_str_name(),
        "message": reject.to_string(),
    });
    if let Some(id) = message_id {
        frame["messageId"] = json!(uuid_text(id));
    }
    frame
}

impl Encoder for LegacyEncoder {
    fn encode(&mut self, item: &Outbound) -> Vec<Message> {
        let frame = match item {
            Outbound::Event(Event::Welcome(welcome)) => {
                self.welcomed = true;
                json!({"type": "init_response", "success": true, "sessionName": welcome.settings.name.as_str()})
            }
            Outbound::Event(Event::Deliver { message, .. }) => {
                // Only LEGACY_JSON reaches legacy connections; its payload is the
                // {"data","hash"} object the publisher sent (checked on the way in;
                // `null` only for one stored by a broker before that check).
                let body: Value = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
                json!({
                    "type": "message",
                    "topic": message.topic.as_str(),
                    "data": body.get("data").cloned().unwrap_or(Value::Null),
                    "hash": body.get("hash").cloned().unwrap_or(Value::Null),
                    "timestamp": message.timestamp_ms,
                    "messageId": uuid_text(&message.id),
                })
            }
            Outbound::Event(Event::PubAck { message_id, status }) => json!({
                "type": "ack_received",
                "messageId": uuid_text(message_id),
                "status": status.as_str_name(),
            }),
            Outbound::Event(Event::Error(e))
                if !self.welcomed
                    && !matches!(e.reject, Reject::NotAuthenticated | Reject::InvalidFrame(_)) =>
            {
                let reject = &e.reject;
                // A refused init: the seed's answer, then the connection closes.
                let frame =
                    json!({"type": "init_response", "success": false, "error": reject.to_string()});
                return vec![
                    text(frame),
                    websocket::close_message(websocket::close::POLICY, &reject.to_string()),
                ];
            }
            Outbound::Event(Event::Error(e)) => error_frame(&e.reject, e.message_id.as_ref()),
            // Closed before login (a malformed init, no init in time, a suspended
            // session): the answer the seed's client waits for. The close follows.
            Outbound::Close(reject) if !self.welcomed => {
                json!({"type": "init_response", "success": false, "error": reject.to_string()})
            }
            Outbound::Close(reject) => error_frame(reject, None),
            Outbound::PushTokenRegistered(_) => {
                json!({"type": "register_fcm_token_response", "success": true})
            }
            Outbound::FileAccepted(file_id) => {
                json!({"type": "ack_received", "messageId": uuid_text(file_id)})
            }
            // No legacy counterpart: subscribe gets no reply (design §10).
            Outbound::Event(
                Event::Subscribed { .. }
                | Event::Unsubscribed { .. }
                | Event::Presence(_)
                | Event::Keys { .. },
            )
            | Outbound::Pong(_) => return Vec::new(),
        };
        vec![text(frame)]
    }

    fn encode_file(&mut self, item: &FileItem) -> Vec<Message> {
        let frame = match item {
            FileItem::Header(meta) => {
                self.file_topics
                    .insert(meta.file_id, meta.topic.as_str().to_owned());
                json!({
                    "type": "init_file",
                    "fileId": uuid_text(&meta.file_id),
                    "fileName": String::from_utf8_lossy(&meta.name),
                    "fileSize": meta.size,
                    "totalChunks": meta.chunk_count,
                    "topic": meta.topic.as_str(),
                })
            }
            FileItem::Chunk {
                file_id,
                index,
                payload,
            } => {
                let mut frame = Vec::with_capacity(41 + payload.len());
                frame.push(0x02);
                frame.extend_from_slice(uuid_text(file_id).as_bytes());
                frame.extend_from_slice(&index.to_be_bytes());
                frame.extend_from_slice(payload);
                return vec![Message::Binary(frame.into())];
            }
            FileItem::End {
                file_id, trailer, ..
            } => json!({
                "type": "end_file",
                "fileId": uuid_text(file_id),
                "hash": hash_text(&trailer.sha256),
                "topic": self.file_topics.remove(file_id),
            }),
            FileItem::Abort { file_id } => {
                self.file_topics.remove(file_id);
                error_frame(
                    &Reject::Internal("the file transfer was aborted"),
                    Some(file_id),
                )
            }
        };
        vec![text(frame)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Request, Refused> {
        let mut reader = Reader::default();
        match reader.parse(text)? {
            LegacyIn::Request(r) => Ok(r),
            _ => panic!("not a request: {text}"),
        }
    }

    #[test]
    fn seed_frames_parse() {
        let id = "0b6f2a4e-8c1d-4e5f-9a0b-1c2d3e4f5a6b";
        let r = parse(&format!(
            r#"{{"type":"publish","topic":"chat/general","data":"ZW5j","hash":"abc","timestamp":1700000000000,"messageId":"{id}"}}"#
        ));
        let Ok(Request::Publish(p)) = r else {
            panic!("publish refused: {r:?}")
        };
        assert_eq!(uuid_text(&p.message_id), id);
        assert_eq!(p.format, PayloadFormat::LegacyJson);
        let body: Value = serde_json::from_slice(&p.payload).expect("json");
        assert_eq!(body, json!({"data": "ZW5j", "hash": "abc"}));

        let mut reader = Reader::default();
        let r =
            reader.parse(r#"{"type":"init","sessionName":"s","password":"p","userId":"alice"}"#);
        assert!(matches!(
            r,
            Ok(LegacyIn::Request(Request::Hello(HelloRequest {
                client_id: Some(_),
                ..
            })))
        ));
        let r = reader.parse(r#"{"type":"subscribe","topic":"a/#"}"#);
        assert!(
            matches!(
                r,
                Ok(LegacyIn::Request(Request::Subscribe { durable: true, .. }))
            ),
            "userId makes it durable"
        );
        let r = reader.parse(&format!(
            r#"{{"type":"init_file","fileId":"{id}","fileName":"a.pdf","fileSize":10,"totalChunks":1,"topic":"files/x"}}"#
        ));
        assert!(matches!(
            r,
            Ok(LegacyIn::File(FileFrame::InitFile(FileMeta {
                chunk_count: 1,
                size: 10,
                ..
            })))
        ));
        let hash = "ab".repeat(32);
        let r = reader.parse(&format!(
            r#"{{"type":"end_file","fileId":"{id}","hash":"{hash}","topic":"files/x"}}"#
        ));
        assert!(
            matches!(r, Ok(LegacyIn::File(FileFrame::EndFile { sha256, .. })) if sha256.len() == 32)
        );
        let mut chunk = vec![0x02];
        chunk.extend_from_slice(id.as_bytes());
        chunk.extend_from_slice(&7u32.to_be_bytes());
        chunk.extend_from_slice(b"payload");
        let parsed = parse_chunk(Bytes::from(chunk));
        assert!(
            matches!(parsed, Ok(LegacyIn::File(FileFrame::Chunk { index: 7, payload, .. })) if payload == b"payload"[..])
        );
        assert!(matches!(
            parse_chunk(Bytes::from_static(&[0x01; 50])),
            Ok(LegacyIn::Undecodable(Reject::InvalidFrame(_)))
        ));
    }

    #[test]
    fn end_file_hashes_reach_legacy_receivers_as_sent() {
        let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(
            hash_bytes(digest).len(),
            32,
            "native receivers get the digest"
        );
        for sent in [
            digest,
            "",
            "sha256_of_file",
            "d41d8cd98f00b204e9800998ecf8427e",
            "a hash of thirty-two characters.",
            "prüfsumme der datei, 32 bytes!!",
        ] {
            assert_eq!(hash_text(&hash_bytes(sent)), sent);
        }
        // Upper-case hex is the same digest; it comes back in lower case.
        assert_eq!(hash_text(&hash_bytes(&digest.to_uppercase())), digest);
        // A native sender's digest is hex.
        assert_eq!(hash_text(&[0u8; 32]), "00".repeat(32));
    }

    #[test]
    fn bad_frames_are_explained() {
        let sixteen = format!("[{}]", ["\"t\""; 16].join(","));
        for (text, needle) in [
            ("not json", "invalid JSON"),
            ("[1,2]", "JSON object"),
            (sixteen.as_str(), "JSON object"),
        ] {
            let Ok(LegacyIn::Undecodable(reject)) = Reader::default().parse(text) else {
                panic!("{text} is not a frame")
            };
            assert!(reject.to_string().contains(needle), "{text}: {reject}");
        }
        for (text, needle) in [
            (r#"{"type":"launch"}"#, "unknown type"),
            (r#"{"topic":"x"}"#, "type is required"),
            (r#"{"type":"subscribe"}"#, "topic is required"),
            (
                r#"{"type":"subscribe","topic":5}"#,
                "topic must be a string",
            ),
            (
                r#"{"type":"publish","topic":"t","data":"d","hash":"h","timestamp":1,"messageId":"nope"}"#,
                "UUID",
            ),
            (
                r#"{"type":"publish","topic":"t","data":"d","hash":"h","timestamp":"soon","messageId":"0b6f2a4e-8c1d-4e5f-9a0b-1c2d3e4f5a6b"}"#,
                "timestamp",
            ),
        ] {
            let Err(refused) = parse(text) else {
                panic!("accepted {text}")
            };
            assert!(
                refused.reject.to_string().contains(needle),
                "{text}: {}",
                refused.reject
            );
        }
    }

    /// Fields are read as JSON reads them (escapes, `null` for absent), other fields
    /// are skipped whatever they hold, and an init no session could accept fails the
    /// login without a check.
    #[test]
    fn fields_are_read_as_json_and_the_rest_skipped() {
        let r = parse(r#"{"type":"subscribe","topic":"a\/b\u00e9","extra":{"deep":[[0,0],[0]]}}"#);
        let Ok(Request::Subscribe { filter, .. }) = r else {
            panic!("{r:?}")
        };
        assert_eq!(filter.as_str(), "a/bé");
        let r =
            parse(r#"{"type":"register_fcm_token","userId":"u","fcmToken":"t","deviceId":null}"#);
        assert!(
            matches!(&r, Ok(Request::RegisterPushToken(t)) if t.device_id.is_empty()),
            "{r:?}"
        );

        let init = |password: &str| {
            Reader::default().parse(
                &json!({"type": "init", "sessionName": "s", "password": password}).to_string(),
            )
        };
        assert!(matches!(
            init("p"),
            Ok(LegacyIn::Request(Request::Hello(_)))
        ));
        assert!(matches!(
            init(&"p".repeat(super::super::request::MAX_TEXT + 1)),
            Ok(LegacyIn::BadInit(Reject::BadCredentials))
        ));
    }

    #[test]
    fn refused_init_gets_init_response_false() {
        let mut e = LegacyEncoder::default();
        let out = e.encode(&Outbound::Event(Event::error(
            Reject::BadCredentials,
            0,
            None,
        )));
        let Message::Text(t) = &out[0] else {
            panic!("text")
        };
        let v: Value = serde_json::from_str(t.as_str()).expect("json");
        assert_eq!(v["type"], "init_response");
        assert_eq!(v["success"], false);
        assert!(matches!(&out[1], Message::Close(Some(c)) if c.code == 1008));
    }
}
