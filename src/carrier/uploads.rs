//! The file uploads a WebSocket connection multiplexes by file id (`/v1/ws` and the
//! legacy bridge alike; QUIC gives each upload a stream of its own).
//!
//! Both carriers bound them the same way: at most [`MAX_UPLOADS`] open at once, and an
//! upload nothing has arrived for in the connection's idle timeout is dropped (as over
//! QUIC after 60 s). An open upload holds a spool file and its receivers' attention,
//! and a client may keep its connection alive (it answers pings) long after it stopped
//! sending the file. The check runs on each message the connection reads: a connection
//! that sends nothing at all is closed by the same timeout, uploads and all.

use std::collections::HashMap;

use bytes::Bytes;
use tokio::time::Instant;

use crate::core::{MessageId, Reject};

use super::Link;
use super::files::{FileMeta, Upload};
use super::request::Refused;

/// Most file uploads one WebSocket connection may have open at once.
pub const MAX_UPLOADS: usize = 16;

/// The open uploads of one connection, each with the time its last frame came.
pub struct OpenUploads {
    open: HashMap<MessageId, (Upload, Instant)>,
    /// How this carrier writes a file id in its messages (legacy clients use UUIDs).
    id_text: fn(&MessageId) -> String,
}

impl OpenUploads {
    pub fn new(id_text: fn(&MessageId) -> String) -> Self {
        Self {
            open: HashMap::new(),
            id_text,
        }
    }

    /// Admits a file and starts piping it to its receivers.
    pub async fn open(&mut self, link: &Link, meta: FileMeta) -> Result<(), Refused> {
        let file_id = meta.file_id;
        let refused = Refused::for_message(file_id);
        let Some(conn) = link.conn_id() else {
            return Err(refused(Reject::NotAuthenticated));
        };
        if self.open.len() >= MAX_UPLOADS {
            return Err(refused(Reject::LimitExceeded(
                "too many file uploads at once",
            )));
        }
        // A repeated header leaves the upload already open under its id alone.
        if self.open.contains_key(&file_id) {
            return Err(refused(Reject::UPLOAD_UNDER_WAY));
        }
        let upload = Upload::open(link.driver(), conn, meta)
            .await
            .map_err(refused)?;
        self.open.insert(file_id, (upload, Instant::now()));
        Ok(())
    }

    /// Pipes one chunk; a refused chunk aborts its upload.
    pub async fn chunk(
        &mut self,
        id: MessageId,
        index: u32,
        payload: Bytes,
    ) -> Result<(), Refused> {
        let refused = Refused::for_message(id);
        let Some((upload, last)) = self.open.get_mut(&id) else {
            return Err(refused(self.missing(&id)));
        };
        if let Err(reject) = upload.chunk(index, payload).await {
            self.open.remove(&id); // dropping it aborts the transfer
            return Err(refused(reject));
        }
        // From when it was taken: a receiver or the spool may have made it wait.
        *last = Instant::now();
        Ok(())
    }

    /// Ends an upload and tells the client it was accepted.
    pub async fn finish(
        &mut self,
        link: &Link,
        id: MessageId,
        sha256: Bytes,
        mac: Bytes,
    ) -> Result<(), Refused> {
        let refused = Refused::for_message(id);
        let Some((upload, _)) = self.open.remove(&id) else {
            return Err(refused(self.missing(&id)));
        };
        upload.finish(sha256, mac).await.map_err(refused)?;
        link.file_accepted(id).await;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Drops the uploads nothing has arrived for in the connection's idle timeout
    /// (their receivers' streams are aborted and their spool files removed), telling
    /// the client which.
    pub async fn drop_idle(&mut self, link: &Link) {
        if self.open.is_empty() {
            return;
        }
        let idle = link.limits().ws_idle_timeout;
        let now = Instant::now();
        let stale: Vec<MessageId> = self
            .open
            .iter()
            .filter(|(_, (_, last))| now.saturating_duration_since(*last) >= idle)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.open.remove(&id);
            tracing::debug!(file = %id, "dropping an idle file upload");
            let reject = Reject::LimitExceeded(
                "file upload idle for the connection's idle timeout: dropped",
            );
            link.refuse(Refused::for_message(id)(reject)).await;
        }
    }

    fn missing(&self, id: &MessageId) -> Reject {
        Reject::NotFound(format!("no open file upload {}", (self.id_text)(id)))
    }
}
