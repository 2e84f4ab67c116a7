//! Core events → native `ServerFrame`s (shared by QUIC, WebTransport and `/v1/ws`).

use bytes::Bytes;

use crate::core::{Event, Message, Reject};
use crate::proto::{self, ServerFrame, field, server_frame::Kind};

use super::Outbound;
use super::framing::WriteQueue;

/// The broker's version, reported in `Welcome`.
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

fn error_frame(reject: &Reject, request_id: u64, message_id: Option<&[u8; 16]>) -> Kind {
    Kind::Error(proto::Error {
        code: reject.code() as i32,
        message: reject.to_string(),
        request_id,
        message_id: message_id.map_or_else(Bytes::new, |id| Bytes::copy_from_slice(id)),
    })
}

fn deliver(message: &Message, attempt: u32, payload: Bytes) -> proto::Deliver {
    proto::Deliver {
        message_id: Bytes::copy_from_slice(message.id.as_bytes()),
        topic: message.topic.as_str().to_owned(),
        payload,
        timestamp_ms: message.timestamp_ms,
        format: message.format as i32,
        attempt,
    }
}

/// Queues the native frame for one outbound item for a stream write. A large
/// `Deliver`'s payload is not copied: its bytes follow the frame's head on the wire.
pub fn queue_server_frame(out: &Outbound, queue: &mut WriteQueue) {
    match out {
        Outbound::Event(Event::Deliver { message, attempt }) => {
            queue.push_with_payload(
                field::SERVER_DELIVER,
                &deliver(message, *attempt, Bytes::new()),
                field::PAYLOAD,
                message.payload.clone(),
            );
        }
        _ => queue.push(&server_frame(out)),
    }
}

/// The native frame for one outbound item.
pub fn server_frame(out: &Outbound) -> ServerFrame {
    let kind = match out {
        Outbound::Event(event) => match event {
            Event::Welcome(w) => Kind::Welcome(proto::Welcome {
                server_version: SERVER_VERSION.to_owned(),
                connection_id: Bytes::copy_from_slice(&w.connection_id),
                retry_interval_ms: w.settings.retry_interval_ms,
                max_retries: w.settings.max_retries,
                message_expiry_ms: w.settings.message_expiry_ms,
                max_payload_bytes: w.settings.max_payload_bytes,
                replay_window_ms: w.replay_window_ms,
                server_time_ms: w.server_time_ms,
            }),
            Event::Deliver { message, attempt } => {
                Kind::Deliver(deliver(message, *attempt, message.payload.clone()))
            }
            Event::PubAck { message_id, status } => Kind::PubAck(proto::PubAck {
                message_id: Bytes::copy_from_slice(message_id.as_bytes()),
                status: *status as i32,
            }),
            Event::Subscribed { request_id } => Kind::Subscribed(proto::Subscribed {
                request_id: *request_id,
            }),
            Event::Unsubscribed { request_id } => Kind::Unsubscribed(proto::Unsubscribed {
                request_id: *request_id,
            }),
            Event::Presence(p) => Kind::Presence(proto::Presence {
                topic: p.filter.as_str().to_owned(),
                client_id: p.client_id.as_str().to_owned(),
                event: p.event as i32,
            }),
            Event::Keys { request_id, keys } => Kind::Keys(proto::Keys {
                request_id: *request_id,
                keys: keys
                    .iter()
                    .map(|(client_id, key)| proto::KeyEntry {
                        client_id: client_id.as_str().to_owned(),
                        public_key: key.clone(),
                    })
                    .collect(),
            }),
            Event::Error(e) => error_frame(
                &e.reject,
                e.request_id,
                e.message_id.as_ref().map(|m| m.as_bytes()),
            ),
        },
        Outbound::Pong(nonce) => Kind::Pong(proto::Pong { nonce: *nonce }),
        Outbound::PushTokenRegistered(request_id) => {
            Kind::PushTokenRegistered(proto::PushTokenRegistered {
                request_id: *request_id,
            })
        }
        Outbound::FileAccepted(file_id) => Kind::FileAccepted(proto::FileAccepted {
            file_id: Bytes::copy_from_slice(file_id.as_bytes()),
        }),
        Outbound::Close(reject) => error_frame(reject, 0, None),
    };
    ServerFrame { kind: Some(kind) }
}
