//! Core events → native `ServerFrame`s (shared by QUIC, WebTransport and `/v1/ws`).

use bytes::{Bytes, BytesMut};

use crate::core::{Event, Message, Reject};
use crate::proto::{self, ServerFrame, field, server_frame::Kind};

use super::Outbound;
use super::framing::{FrameHead, WriteQueue, bytes_field_len, put_bytes_field};

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

/// Queues the native frame for one outbound item for a stream write. `Deliver` and
/// `PubAck`, one or more per message, are written from the core's event without an
/// owned `proto` struct in between (see [`DeliverHead`]); a large `Deliver`'s payload
/// is not copied either: its bytes follow the frame's head on the wire.
pub fn queue_server_frame(out: &Outbound, queue: &mut WriteQueue) {
    match out {
        Outbound::Event(Event::Deliver { message, attempt }) => {
            let head = DeliverHead {
                message,
                attempt: *attempt,
            };
            queue.push_with_payload(
                field::SERVER_DELIVER,
                &head,
                field::PAYLOAD,
                &message.payload,
            );
        }
        Outbound::Event(Event::PubAck { message_id, status }) => {
            let head = PubAckHead {
                message_id: message_id.as_bytes(),
                status: *status as i32,
            };
            queue.push_head(field::SERVER_PUB_ACK, &head);
        }
        _ => queue.push(&server_frame(out)),
    }
}

/// A `Deliver` without its payload, its fields borrowed from the core's message. The
/// owned `proto::Deliver` costs three allocations per delivery: the id's `Bytes`, the
/// topic's `String`, and the copy prost makes of a `Bytes` field as it writes it. The
/// bytes written are prost's (fields in tag order, defaults left out); a test holds
/// them to it.
struct DeliverHead<'a> {
    message: &'a Message,
    attempt: u32,
}

impl FrameHead for DeliverHead<'_> {
    fn head_len(&self) -> usize {
        use prost::encoding::{int32, uint32, uint64};
        let m = self.message;
        let format = m.format as i32;
        let mut len =
            bytes_field_len(1, m.id.as_bytes()) + bytes_field_len(2, m.topic.as_str().as_bytes());
        if m.timestamp_ms != 0 {
            len += uint64::encoded_len(4, &m.timestamp_ms);
        }
        if format != 0 {
            len += int32::encoded_len(5, &format);
        }
        if self.attempt != 0 {
            len += uint32::encoded_len(6, &self.attempt);
        }
        len
    }

    fn put_head(&self, buf: &mut BytesMut) {
        use prost::encoding::{int32, uint32, uint64};
        let m = self.message;
        put_bytes_field(1, m.id.as_bytes(), buf);
        put_bytes_field(2, m.topic.as_str().as_bytes(), buf);
        if m.timestamp_ms != 0 {
            uint64::encode(4, &m.timestamp_ms, buf);
        }
        let format = m.format as i32;
        if format != 0 {
            int32::encode(5, &format, buf);
        }
        if self.attempt != 0 {
            uint32::encode(6, &self.attempt, buf);
        }
    }
}

/// A `PubAck`, borrowed like [`DeliverHead`].
struct PubAckHead<'a> {
    message_id: &'a [u8],
    status: i32,
}

impl FrameHead for PubAckHead<'_> {
    fn head_len(&self) -> usize {
        let mut len = bytes_field_len(1, self.message_id);
        if self.status != 0 {
            len += prost::encoding::int32::encoded_len(2, &self.status);
        }
        len
    }

    fn put_head(&self, buf: &mut BytesMut) {
        put_bytes_field(1, self.message_id, buf);
        if self.status != 0 {
            prost::encoding::int32::encode(2, &self.status, buf);
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use prost::Message as _;

    use crate::carrier::framing::encode_frame;
    use crate::core::{MessageId, MessageKind, SessionName, TopicName};
    use crate::proto::{PayloadFormat, PubAckStatus};

    /// What `queue_server_frame` writes for `out`, and what prost writes for the
    /// owned frame.
    fn written(out: &Outbound) -> (Vec<u8>, Vec<u8>) {
        let mut queue = WriteQueue::default();
        queue_server_frame(out, &mut queue);
        let ours = queue.chunks().iter().flat_map(|c| c.to_vec()).collect();
        let mut prost = BytesMut::new();
        encode_frame(&server_frame(out), &mut prost);
        (ours, prost.to_vec())
    }

    /// Written from borrowed fields, a `Deliver` decodes to the frame prost would
    /// have written, as long (its payload comes last rather than in tag order; see
    /// `WriteQueue::push_with_payload`), and a `PubAck` is byte for byte prost's:
    /// defaults left out, large varints, payloads copied or chunked.
    #[test]
    fn borrowed_heads_write_what_prost_writes() {
        let cases = [
            (0, PayloadFormat::Unspecified, 0, 0, "t"),
            (1_700_000_000_000, PayloadFormat::NativeV1, 1, 128, "a/b/c"),
            (
                u64::MAX,
                PayloadFormat::LegacyJson,
                u32::MAX,
                20 * 1024,
                "long/topic/name",
            ),
        ];
        for (timestamp_ms, format, attempt, size, topic) in cases {
            let message = Message {
                session: SessionName::parse("s").expect("valid"),
                id: MessageId([0xA5; 16]),
                seq: 7,
                topic: TopicName::parse(topic).expect("valid"),
                payload: Bytes::from(vec![3u8; size]),
                timestamp_ms,
                format,
                kind: MessageKind::Message,
                accepted_at: 1,
                expires_at: 2,
            };
            let out = Outbound::Event(Event::Deliver {
                message: Arc::new(message),
                attempt,
            });
            let (ours, prost) = written(&out);
            assert_eq!(ours.len(), prost.len());
            let decoded = ServerFrame::decode_length_delimited(&ours[..]).expect("decodes");
            assert_eq!(
                decoded,
                server_frame(&out),
                "Deliver {timestamp_ms} {format:?} {attempt} {size}"
            );
        }
        for status in [
            PubAckStatus::Unspecified,
            PubAckStatus::Stored,
            PubAckStatus::Accepted,
            PubAckStatus::Delivered,
            PubAckStatus::NoSubscribers,
        ] {
            let out = Outbound::Event(Event::PubAck {
                message_id: MessageId([9; 16]),
                status,
            });
            let (ours, prost) = written(&out);
            assert_eq!(ours, prost, "PubAck {status:?}");
        }
    }
}
