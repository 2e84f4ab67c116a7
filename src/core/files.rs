//! File transfers: the core authorises them and names their receivers; the bytes never
//! pass through it (carriers stream them under transport flow control, design §3).

use crate::proto::PayloadFormat;

use super::Core;
use super::command::{FileOffer, StoreOp};
use super::error::Reject;
use super::types::{ConnId, Millis};

impl Core {
    /// Admits a file offered by `conn` (auth, size, replay of its id) and returns the
    /// online connections subscribed to its topic, one entry each. Connections that can
    /// only read `LEGACY_JSON` get only legacy files.
    pub fn open_file(
        &mut self,
        now: Millis,
        conn: ConnId,
        offer: &FileOffer,
    ) -> Result<Vec<ConnId>, Reject> {
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
        session
            .replay
            .admit(now, offer.file_id, offer.timestamp_ms)?;
        self.fx.ops.push(StoreOp::PutReplayId {
            session: session.settings.name.clone(),
            id: offer.file_id,
            expires_at: session.replay.expiry_of(offer.timestamp_ms),
        });
        let legacy = offer.format == PayloadFormat::LegacyJson;
        let mut receivers = Vec::new();
        session.tree.for_each_match(&offer.topic, |(client, _)| {
            if let Some(sub) = session.subscribers.get(client)
                && let Some(conn) = sub.conn
                && (legacy || !sub.legacy_only)
            {
                receivers.push(conn);
            }
        });
        receivers.sort_unstable();
        receivers.dedup();
        Ok(receivers)
    }
}
