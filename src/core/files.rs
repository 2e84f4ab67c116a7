//! File transfers: the core authorises them, names their live receivers and, once a
//! file has arrived whole, queues it like a message. The bytes never pass through it:
//! carriers stream them under transport flow control and keep them in the spool
//! (design §3), and a copy of a file stands for the spool file when it is sent again.
//!
//! A file's id is held in the replay set from its offer, but committed only with the
//! file (design §4: an id is recorded once the broker has accepted what it names), and
//! an upload that ends short gives it back. While an upload runs, another offer of its
//! id is refused `RATE_LIMITED` ("send it again once that upload ends"), not
//! `REPLAYED`: the first upload may yet fail (its sender may be gone without the broker
//! knowing yet), so `REPLAYED` keeps meaning "already accepted".

use std::sync::Arc;

use super::Core;
use super::command::{FileDone, FileOffer, FileRoute, Message, MessageKind, StoreOp};
use super::error::Reject;
use super::router::fan_out;
use super::types::{ConnId, MessageId, Millis, SessionName};

impl Core {
    /// Admits a file offered by `conn` (auth, size, replay of its id) and says where it
    /// goes: the online connections subscribed to its topic, one entry each (those that
    /// can only read `LEGACY_JSON` get only legacy files), and whether anyone, online
    /// or not, wants it.
    pub fn open_file(
        &mut self,
        now: Millis,
        conn: ConnId,
        offer: &FileOffer,
    ) -> Result<FileRoute, Reject> {
        let c = self.conns.get(&conn).ok_or(Reject::NotAuthenticated)?;
        let session = self
            .sessions
            .get_mut(&c.session)
            .ok_or(Reject::Internal("session vanished"))?;
        if session.settings.suspended {
            return Err(Reject::SessionSuspended);
        }
        if offer.size > self.config.max_file_bytes {
            return Err(Reject::PayloadTooLarge {
                size: offer.size,
                limit: self.config.max_file_bytes,
            });
        }
        if session.uploading.contains(&offer.file_id) {
            return Err(Reject::UPLOAD_UNDER_WAY);
        }
        session
            .replay
            .admit(now, offer.file_id, offer.timestamp_ms)?;
        session.uploading.insert(offer.file_id);
        let mut route = FileRoute {
            session: session.settings.name.clone(),
            live: Vec::new(),
            spool: false,
            durable: false,
        };
        session
            .tree
            .for_each_match(&offer.topic, |(client, durable)| {
                let Some(sub) = session.subscribers.get(client) else {
                    return;
                };
                if !sub.reads(offer.format) {
                    return;
                }
                route.spool = true;
                route.durable |= *durable;
                if let Some(conn) = sub.conn {
                    route.live.push(conn);
                }
            });
        route.live.sort_unstable();
        route.live.dedup();
        Ok(route)
    }

    /// A file sent by `conn` has arrived whole: its id is recorded and, if it is in
    /// the spool, every subscriber whose filters match gets a copy, queued and retried
    /// like a message's. The connections in `done.live` already have every chunk, so
    /// theirs count as sent. Returns whether durable copies were written; either way
    /// the file is accepted once the current batch ([`Core::current_batch`]) is
    /// committed.
    pub fn complete_file(
        &mut self,
        now: Millis,
        conn: ConnId,
        done: FileDone,
    ) -> Result<bool, Reject> {
        let c = self.conns.get(&conn).ok_or(Reject::NotAuthenticated)?;
        let session = self
            .sessions
            .get_mut(&c.session)
            .ok_or(Reject::Internal("session vanished"))?;
        if !session.uploading.remove(&done.file_id) {
            // Its upload was given up first (the sender went away meanwhile).
            return Err(Reject::NotFound("the file's upload has ended".into()));
        }
        let settings = &session.settings;
        self.fx.ops.push(StoreOp::PutReplayId {
            session: settings.name.clone(),
            id: done.file_id,
            expires_at: session.replay.expiry_of(done.timestamp_ms),
        });
        if !done.spooled {
            return Ok(false);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let message = Arc::new(Message {
            session: settings.name.clone(),
            id: done.file_id,
            seq,
            topic: done.topic,
            payload: done.header,
            timestamp_ms: done.timestamp_ms,
            format: done.format,
            kind: MessageKind::File,
            accepted_at: now,
            expires_at: now.saturating_add(settings.message_expiry_ms),
        });

        let (_, durable_copies) = fan_out(
            session,
            &mut self.matched,
            &self.config.limits,
            &mut self.fx,
            &message,
            &done.live,
            now,
        );
        // Nobody wants it any more: the spool file goes at once.
        self.fx.hold_file(&message);
        self.fx.release_file(&message);
        Ok(durable_copies > 0)
    }

    /// An upload of `session` ended before its file was accepted: the id is free
    /// again, so the sender can send the file again under it. An upload that was
    /// completed meanwhile keeps its id.
    pub fn abandon_file(
        &mut self,
        session: &SessionName,
        file_id: &MessageId,
        timestamp_ms: Millis,
    ) {
        if let Some(session) = self.sessions.get_mut(session)
            && session.uploading.remove(file_id)
        {
            session.replay.forget(file_id, timestamp_ms);
        }
    }
}
