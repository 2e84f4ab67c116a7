//! Client frames parsed into typed, validated requests: the one place where a peer's
//! fields are checked ("parse, don't validate"). Every carrier that speaks the native
//! frames goes through here; the legacy bridge builds the same [`Request`]s from JSON.

use bytes::Bytes;

use crate::core::{ClientId, MessageId, Publish, Reject, SessionName, TopicFilter, TopicName};
use crate::proto::{self, PayloadFormat, client_frame::Kind};

/// The protocol version this broker speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A `Hello`, validated.
#[derive(Clone)]
pub struct HelloRequest {
    pub protocol_version: u32,
    pub session: SessionName,
    /// Never logged.
    pub password: String,
    /// `None`: the client did not pick one.
    pub client_id: Option<ClientId>,
    pub clean: bool,
}

impl std::fmt::Debug for HelloRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelloRequest")
            .field("protocol_version", &self.protocol_version)
            .field("session", &self.session)
            .field("password", &"<redacted>")
            .field("client_id", &self.client_id)
            .field("clean", &self.clean)
            .finish()
    }
}

/// A `RegisterPushToken`, validated. The token is a secret.
#[derive(Clone)]
pub struct PushTokenRequest {
    pub request_id: u64,
    pub user_id: String,
    pub token: String,
    pub device_id: String,
    pub platform: String,
}

/// What a carrier calls the fields of a push-token registration, for its errors.
pub struct PushTokenFields {
    pub user_id: &'static str,
    pub token: &'static str,
    pub device_id: &'static str,
    pub platform: &'static str,
}

impl PushTokenFields {
    /// `RegisterPushToken`'s.
    pub const NATIVE: Self = Self {
        user_id: "user_id",
        token: "token",
        device_id: "device_id",
        platform: "platform",
    };
    /// The legacy bridge's `register_fcm_token`'s.
    pub const LEGACY: Self = Self {
        user_id: "userId",
        token: "fcmToken",
        device_id: "deviceId",
        platform: "platform",
    };
}

impl PushTokenRequest {
    /// Checks the fields, the same from every carrier: a user id and a token are
    /// required, and no field is longer than 4096 bytes (an FCM token is ~200).
    pub fn new(
        request_id: u64,
        names: &PushTokenFields,
        user_id: String,
        token: String,
        device_id: String,
        platform: String,
    ) -> Result<Self, Reject> {
        if token.is_empty() || user_id.is_empty() {
            return Err(invalid(format!(
                "{} and {} are required",
                names.user_id, names.token
            )));
        }
        Ok(Self {
            request_id,
            user_id: text(names.user_id, user_id)?,
            token: text(names.token, token)?,
            device_id: text(names.device_id, device_id)?,
            platform: text(names.platform, platform)?,
        })
    }
}

impl std::fmt::Debug for PushTokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushTokenRequest")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

/// One client request.
#[derive(Debug, Clone)]
pub enum Request {
    Hello(HelloRequest),
    Subscribe {
        request_id: u64,
        filter: TopicFilter,
        durable: bool,
        history: u32,
        presence: bool,
    },
    Unsubscribe {
        request_id: u64,
        filter: TopicFilter,
    },
    Publish(Publish),
    Ack(MessageId),
    Ping(u64),
    RegisterPushToken(PushTokenRequest),
    PublishKey {
        request_id: u64,
        public_key: Bytes,
    },
    GetKeys {
        request_id: u64,
    },
}

impl Request {
    /// `reject` as the answer to this request: the `Error` echoes its `request_id`,
    /// or the `message_id` of a publish, so a client can tell which request failed.
    pub fn refused(&self, reject: Reject) -> Refused {
        let request_id = match self {
            Request::Subscribe { request_id, .. }
            | Request::Unsubscribe { request_id, .. }
            | Request::PublishKey { request_id, .. }
            | Request::GetKeys { request_id } => *request_id,
            Request::RegisterPushToken(r) => r.request_id,
            Request::Publish(p) => return Refused::for_message(p.message_id)(reject),
            Request::Hello(_) | Request::Ack(_) | Request::Ping(_) => 0,
        };
        Refused::for_request(request_id)(reject)
    }
}

/// A refused request, with what the `Error` frame should echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reject: Reject,
    pub request_id: u64,
    pub message_id: Option<MessageId>,
}

impl Refused {
    pub fn new(reject: Reject) -> Self {
        Self {
            reject,
            request_id: 0,
            message_id: None,
        }
    }

    /// A refusal of the publish or file `message_id` (an `Error` naming it).
    pub fn for_message(message_id: MessageId) -> impl Fn(Reject) -> Self + Copy {
        move |reject| Self {
            reject,
            request_id: 0,
            message_id: Some(message_id),
        }
    }

    fn for_request(request_id: u64) -> impl Fn(Reject) -> Self {
        move |reject| Self {
            reject,
            request_id,
            message_id: None,
        }
    }
}

fn invalid(why: impl Into<String>) -> Reject {
    Reject::InvalidFrame(why.into())
}

/// Longest free-text field (push tokens, user and device ids, platform).
pub(super) const MAX_TEXT: usize = 4096;

fn text(field: &'static str, value: String) -> Result<String, Reject> {
    if value.len() > MAX_TEXT {
        return Err(invalid(format!("{field} is longer than {MAX_TEXT} bytes")));
    }
    Ok(value)
}

/// Parses a payload format; unspecified or unknown values are refused.
pub fn parse_format(raw: i32) -> Result<PayloadFormat, Reject> {
    match PayloadFormat::try_from(raw) {
        Ok(f @ (PayloadFormat::NativeV1 | PayloadFormat::LegacyJson)) => Ok(f),
        _ => Err(invalid("format must be NATIVE_V1 or LEGACY_JSON")),
    }
}

/// A `LEGACY_JSON` payload is the JSON `{"data":…,"hash":…}` a Dart client sends
/// (design §5): legacy subscribers get those two strings, and could do nothing with a
/// message without them, so a native publish of anything else is refused here. (The
/// strings are ciphertext and a hash: nothing in them is read.)
fn check_legacy_json(payload: &[u8]) -> Result<(), Reject> {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow, rename = "data")]
        _data: std::borrow::Cow<'a, str>,
        #[serde(borrow, rename = "hash")]
        _hash: std::borrow::Cow<'a, str>,
    }
    // A derived struct also reads a JSON array (`["…","…"]`): only an object will do.
    let object = payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    match serde_json::from_slice::<Envelope<'_>>(payload) {
        Ok(_) if object => Ok(()),
        _ => Err(invalid(
            r#"a LEGACY_JSON payload is the JSON {"data":"<base64>","hash":"<hex>"}"#,
        )),
    }
}

impl TryFrom<proto::ClientFrame> for Request {
    type Error = Refused;

    fn try_from(frame: proto::ClientFrame) -> Result<Self, Refused> {
        let Some(kind) = frame.kind else {
            return Err(Refused::new(invalid("empty frame (no kind set)")));
        };
        match kind {
            Kind::Hello(h) => {
                let session = SessionName::parse(&h.session).map_err(|e| Refused::new(e.into()))?;
                let client_id = match h.client_id.as_str() {
                    "" => None,
                    c => Some(ClientId::parse(c).map_err(|e| Refused::new(e.into()))?),
                };
                if h.password.len() > MAX_TEXT {
                    return Err(Refused::new(invalid("password is too long")));
                }
                Ok(Request::Hello(HelloRequest {
                    protocol_version: h.protocol_version,
                    session,
                    password: h.password,
                    client_id,
                    clean: h.clean,
                }))
            }
            Kind::Subscribe(s) => {
                let refused = Refused::for_request(s.request_id);
                Ok(Request::Subscribe {
                    request_id: s.request_id,
                    filter: TopicFilter::parse(&s.topic).map_err(|e| refused(e.into()))?,
                    durable: s.durable,
                    history: s.history,
                    presence: s.presence,
                })
            }
            Kind::Unsubscribe(u) => {
                let refused = Refused::for_request(u.request_id);
                Ok(Request::Unsubscribe {
                    request_id: u.request_id,
                    filter: TopicFilter::parse(&u.topic).map_err(|e| refused(e.into()))?,
                })
            }
            Kind::Publish(p) => {
                let message_id =
                    MessageId::from_slice(&p.message_id).map_err(|e| Refused::new(e.into()))?;
                let refused = |reject| Refused {
                    reject,
                    request_id: 0,
                    message_id: Some(message_id),
                };
                let format = parse_format(p.format).map_err(refused)?;
                if format == PayloadFormat::LegacyJson {
                    check_legacy_json(&p.payload).map_err(refused)?;
                }
                Ok(Request::Publish(Publish {
                    message_id,
                    topic: TopicName::parse(&p.topic).map_err(|e| refused(e.into()))?,
                    payload: p.payload,
                    timestamp_ms: p.timestamp_ms,
                    format,
                }))
            }
            Kind::Ack(a) => Ok(Request::Ack(
                MessageId::from_slice(&a.message_id).map_err(|e| Refused::new(e.into()))?,
            )),
            Kind::Ping(p) => Ok(Request::Ping(p.nonce)),
            Kind::RegisterPushToken(r) => {
                let names = &PushTokenFields::NATIVE;
                PushTokenRequest::new(
                    r.request_id,
                    names,
                    r.user_id,
                    r.token,
                    r.device_id,
                    r.platform,
                )
                .map(Request::RegisterPushToken)
                .map_err(Refused::for_request(r.request_id))
            }
            Kind::PublishKey(k) => Ok(Request::PublishKey {
                request_id: k.request_id,
                public_key: k.public_key,
            }),
            Kind::GetKeys(g) => Ok(Request::GetKeys {
                request_id: g.request_id,
            }),
            Kind::FileHeader(h) => Err(Refused {
                reject: invalid("file frames travel on their own stream, not the control stream"),
                request_id: 0,
                message_id: MessageId::from_slice(&h.file_id).ok(),
            }),
            Kind::FileChunk(_) | Kind::FileEnd(_) => Err(Refused::new(invalid(
                "file frames travel on their own stream, not the control stream",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ClientFrame, client_frame};

    fn parse(kind: client_frame::Kind) -> Result<Request, Refused> {
        Request::try_from(ClientFrame { kind: Some(kind) })
    }

    #[test]
    fn empty_frame_is_invalid() {
        let r = Request::try_from(ClientFrame { kind: None });
        assert!(matches!(
            r,
            Err(Refused {
                reject: Reject::InvalidFrame(_),
                ..
            })
        ));
    }

    #[test]
    fn publish_errors_echo_the_message_id() {
        let r = parse(client_frame::Kind::Publish(proto::Publish {
            message_id: vec![5; 16].into(),
            topic: "a/+".into(),
            payload: Bytes::new(),
            timestamp_ms: 1,
            format: PayloadFormat::NativeV1 as i32,
        }));
        let Err(refused) = r else {
            panic!("wildcard topic accepted")
        };
        assert_eq!(refused.message_id, Some(MessageId([5; 16])));

        let r = parse(client_frame::Kind::Publish(proto::Publish {
            message_id: vec![5; 16].into(),
            topic: "a".into(),
            payload: Bytes::new(),
            timestamp_ms: 1,
            format: 0,
        }));
        assert!(r.is_err(), "unspecified format is refused");

        let r = parse(client_frame::Kind::Publish(proto::Publish {
            message_id: vec![5; 3].into(),
            ..Default::default()
        }));
        assert!(r.is_err(), "short id is refused");
    }

    #[test]
    fn subscribe_errors_echo_the_request_id() {
        let r = parse(client_frame::Kind::Subscribe(proto::Subscribe {
            request_id: 42,
            topic: "a/#/b".into(),
            ..Default::default()
        }));
        assert!(matches!(r, Err(Refused { request_id: 42, .. })));
    }

    #[test]
    fn hello_debug_hides_the_password() {
        let Ok(Request::Hello(h)) = parse(client_frame::Kind::Hello(proto::Hello {
            protocol_version: 1,
            session: "s".into(),
            password: "hunter2".into(),
            client_id: String::new(),
            clean: false,
        })) else {
            panic!("valid hello refused")
        };
        assert!(h.client_id.is_none());
        assert!(!format!("{h:?}").contains("hunter2"));
    }
}
