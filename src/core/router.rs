//! Publish: admission (auth, limits, replay) and fan-out of one message to the
//! subscribers whose filters match it.

use std::sync::Arc;

use crate::proto::PubAckStatus;

use super::command::{Message, MessageKind, Publish, StoreOp};
use super::delivery::{Copy, Ctx};
use super::error::Reject;
use super::session::Session;
use super::types::{ClientId, ConnId, Millis};
use super::{Core, Effects, Limits, Waiter};

impl Core {
    pub(super) fn publish(&mut self, now: Millis, conn: ConnId, p: Publish) {
        let id = p.message_id;
        let Some(c) = self.conns.get(&conn) else {
            return self.refuse_publish(conn, id, Reject::NotAuthenticated);
        };
        let Some(session) = self.sessions.get_mut(&c.session) else {
            return self.refuse_publish(conn, id, Reject::Internal("session vanished"));
        };
        let settings = &session.settings;
        if settings.suspended {
            return self.refuse_publish(conn, id, Reject::SessionSuspended);
        }
        let size = p.payload.len() as u64;
        if size > settings.max_payload_bytes {
            let limit = settings.max_payload_bytes;
            return self.refuse_publish(conn, id, Reject::PayloadTooLarge { size, limit });
        }
        if let Err(reject) = session.replay.admit(now, id, p.timestamp_ms) {
            return self.refuse_publish(conn, id, reject);
        }

        let seq = self.next_seq;
        self.next_seq += 1;
        let message = Arc::new(Message {
            session: settings.name.clone(),
            id,
            seq,
            topic: p.topic,
            payload: p.payload,
            timestamp_ms: p.timestamp_ms,
            format: p.format,
            kind: MessageKind::Message,
            accepted_at: now,
            expires_at: now.saturating_add(settings.message_expiry_ms),
        });
        self.fx.ops.push(StoreOp::PutReplayId {
            session: settings.name.clone(),
            id,
            expires_at: session.replay.expiry_of(p.timestamp_ms),
        });
        session.retain(&message, now);

        let (copies, durable_copies) = fan_out(
            session,
            &mut self.matched,
            &self.config.limits,
            &mut self.fx,
            &message,
            &[],
            now,
        );

        let status = match (copies, durable_copies) {
            (0, _) => PubAckStatus::NoSubscribers,
            (_, 0) => PubAckStatus::Accepted,
            _ => PubAckStatus::Stored,
        };
        if copies > 0 {
            // Acks that come before the batch commits make the answer `DELIVERED`.
            self.fx.unacked.insert(seq, copies);
        }
        // The answer waits for the batch holding the replay id (and durable copies).
        self.waiters.push_back((
            self.batch_id,
            Waiter::PubAck {
                conn,
                session: message.session.clone(),
                seq,
                message_id: id,
                timestamp_ms: message.timestamp_ms,
                status,
            },
        ));
    }
}

/// Gives each subscriber of `session` whose filters match `message` its copy, in
/// accept order: durable ones are written to the store, with the message once. The
/// connections in `live` (sorted) have it already (a file streamed to them as it
/// arrived). `matched` is scratch space kept between calls (no list allocated per
/// message). Returns how many copies were made, and how many of them are durable.
pub(super) fn fan_out(
    session: &mut Session,
    matched: &mut Vec<(ClientId, bool)>,
    limits: &Limits,
    fx: &mut Effects,
    message: &Arc<Message>,
    live: &[ConnId],
    now: Millis,
) -> (usize, usize) {
    session.match_subscribers(&message.topic, matched);
    let ctx = &mut Ctx {
        settings: &session.settings,
        limits,
        fx,
    };
    let (mut copies, mut durable_copies) = (0usize, 0usize);
    for (client, durable) in matched.drain(..) {
        let Some(sub) = session.subscribers.get_mut(&client) else {
            continue;
        };
        if !sub.reads(message.format) {
            continue; // nothing is queued for it
        }
        if durable {
            if durable_copies == 0 {
                ctx.fx.ops.push(StoreOp::PutMessage(message.clone()));
            }
            ctx.fx.ops.push(StoreOp::PutCopy {
                session: ctx.settings.name.clone(),
                client_id: client,
                seq: message.seq,
                ephemeral: false,
                replayed: false,
            });
            durable_copies += 1;
        }
        copies += 1;
        let copy = Copy {
            message: message.clone(),
            durable,
            persisted: durable,
            attempts: 0,
            counted: true,
        };
        ctx.fx.hold_file(message);
        if sub.conn.is_some_and(|c| live.binary_search(&c).is_ok()) {
            sub.sent_live(copy, now, ctx);
        } else {
            sub.offer(copy, now, ctx);
        }
    }
    (copies, durable_copies)
}
