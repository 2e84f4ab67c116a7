//! File transfers in the carrier layer: the bytes never reach the core.
//!
//! The sender's carrier parses the `FileHeader`, asks the core (through the driver)
//! to admit the file and name its receivers, then pipes each chunk to every receiver's
//! *file port*: a small bounded queue that the receiver's carrier drains onto its own
//! wire (a QUIC unidirectional stream per file, `/v1/ws` binary frames, or the legacy
//! `init_file`/binary/`end_file` frames). Awaiting those queues is the end-to-end flow
//! control: a slow receiver slows the sender, and memory per transfer stays at a few
//! chunks.
//!
//! Every file someone subscribes to is also written to the spool ([`crate::spool`]) as
//! it arrives. A receiver whose port stays full for [`SPOOL_SWITCH`] is switched to it
//! (its stream is aborted), so it holds back neither the sender nor the others. Once
//! the file is whole, the core queues a copy for every subscriber like a message's:
//! the receivers that streamed it count as sent (and get the end now); the rest, and
//! those that do not acknowledge it, get it from the spool, offline durable
//! subscribers when they come back.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

use crate::core::{ConnId, FileDone, FileOffer, MessageId, Millis, Reject, SessionName, TopicName};
use crate::driver::{DriverGone, DriverHandle, NotAccepted};
use crate::proto::{self, PayloadFormat, ServerFrame, server_frame};
use crate::spool::SpoolWriter;

use super::framing;
use super::request::{Refused, parse_format};

/// Chunks queued per receiver.
pub const FILE_PORT_CAPACITY: usize = 16;
/// How long one receiver may hold back a file as it arrives (its port full) before
/// it is switched to the spool.
pub const SPOOL_SWITCH: Duration = Duration::from_secs(1);
/// How long a file port may stay full before whatever waits on it gives up.
pub const RECEIVER_STALL: Duration = Duration::from_secs(30);
/// Ciphertext overhead allowed per chunk on top of the plaintext (version, IV,
/// padding, tag).
const CHUNK_OVERHEAD: u64 = 1 + 16 + 16 + 32;

/// What the broker knows of a file: its `FileHeader`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub file_id: MessageId,
    pub topic: TopicName,
    /// Sealed (`NATIVE_V1`) or, for legacy files, the plain name.
    pub name: Bytes,
    pub size: u64,
    pub chunk_size: u32,
    pub chunk_count: u32,
    pub timestamp_ms: Millis,
    pub format: PayloadFormat,
}

impl FileMeta {
    /// Longest file name (sealed or, for legacy files, plain) the broker keeps.
    pub const MAX_NAME: usize = 4096;

    /// Why a name over [`Self::MAX_NAME`] is refused.
    pub fn name_too_long() -> String {
        format!("file name is longer than {} bytes", Self::MAX_NAME)
    }

    /// Validates a `FileHeader` from a client.
    pub fn from_header(h: proto::FileHeader) -> Result<Self, Refused> {
        let file_id = MessageId::from_slice(&h.file_id).map_err(|e| Refused::new(e.into()))?;
        let refused = Refused::for_message(file_id);
        let format = match h.format {
            0 => PayloadFormat::NativeV1,
            raw => parse_format(raw).map_err(refused)?,
        };
        if h.name.len() > Self::MAX_NAME {
            return Err(refused(Reject::InvalidFrame(Self::name_too_long())));
        }
        Ok(Self {
            file_id,
            topic: TopicName::parse(&h.topic).map_err(|e| refused(e.into()))?,
            name: h.name,
            size: h.size,
            chunk_size: h.chunk_size,
            chunk_count: h.chunk_count,
            timestamp_ms: h.timestamp_ms,
            format,
        })
    }

    pub fn offer(&self) -> FileOffer {
        FileOffer {
            file_id: self.file_id,
            topic: self.topic.clone(),
            timestamp_ms: self.timestamp_ms,
            format: self.format,
            size: self.size,
        }
    }

    pub fn to_proto(&self) -> proto::FileHeader {
        proto::FileHeader {
            file_id: Bytes::copy_from_slice(self.file_id.as_bytes()),
            topic: self.topic.as_str().to_owned(),
            name: self.name.clone(),
            size: self.size,
            chunk_size: self.chunk_size,
            timestamp_ms: self.timestamp_ms,
            format: self.format as i32,
            chunk_count: self.chunk_count,
        }
    }
}

/// One item of a receiver's file port.
#[derive(Debug)]
pub enum FileItem {
    Header(Arc<FileMeta>),
    Chunk {
        file_id: MessageId,
        index: u32,
        payload: Bytes,
    },
    /// The last item of a file; `written` fires once it is on the receiver's wire.
    End {
        file_id: MessageId,
        trailer: Arc<FileTrailer>,
        written: oneshot::Sender<()>,
    },
    /// The sender went away (or the receiver was dropped): discard the file.
    Abort {
        file_id: MessageId,
    },
}

/// The end of a file: its plaintext hash and MAC, opaque to the broker. (Shared, and
/// behind a pointer: every connection's file port allocates a block of items up front,
/// so the items stay small.)
#[derive(Debug)]
pub struct FileTrailer {
    pub sha256: Bytes,
    pub mac: Bytes,
}

/// A connection's file port.
pub type FilePort = mpsc::Sender<FileItem>;

/// A receiver of a file while it arrives.
struct Receiver {
    conn: ConnId,
    port: FilePort,
}

/// One file being received from a sender, piped to its receivers and written to the
/// spool.
pub struct Upload {
    meta: Arc<FileMeta>,
    driver: DriverHandle,
    conn: ConnId,
    session: SessionName,
    receivers: Vec<Receiver>,
    /// Where the file is kept for receivers that cannot take it now; `None` if nobody
    /// subscribed to it when it was offered.
    spool: Option<SpoolWriter>,
    /// A durable subscriber matched when the file was offered: the spool file is
    /// synced before the file is accepted.
    durable: bool,
    next_index: u32,
    received: u64,
    max_bytes: u64,
    done: bool,
}

impl Upload {
    /// Admits the file and sends its header to every receiver.
    pub async fn open(
        driver: &DriverHandle,
        conn: ConnId,
        meta: FileMeta,
    ) -> Result<Upload, Reject> {
        let opened = driver
            .open_file(conn, meta.offer())
            .await
            .map_err(|_| Reject::Internal("the broker is shutting down"))??;
        // Made before anything can fail, so that dropping it gives the file's id back.
        let mut upload = Upload {
            meta: Arc::new(meta),
            driver: driver.clone(),
            conn,
            session: opened.session,
            receivers: opened
                .receivers
                .into_iter()
                .map(|(conn, port)| Receiver { conn, port })
                .collect(),
            spool: None,
            durable: opened.durable,
            next_index: 0,
            received: 0,
            max_bytes: driver.core_config().max_file_bytes,
            done: false,
        };
        if opened.spool {
            let spool = driver
                .spool()
                .create(&upload.session, &upload.meta.file_id)?;
            upload.spool = Some(spool);
        }
        let meta = upload.meta.clone();
        upload.forward(|| FileItem::Header(meta.clone())).await;
        Ok(upload)
    }

    pub fn file_id(&self) -> MessageId {
        self.meta.file_id
    }

    /// How many receivers are still attached.
    pub fn receivers(&self) -> usize {
        self.receivers.len()
    }

    /// Pipes one chunk; chunks must arrive in order from index 0.
    pub async fn chunk(&mut self, index: u32, payload: Bytes) -> Result<(), Reject> {
        if index != self.next_index {
            return Err(Reject::InvalidFrame(format!(
                "chunk {index} out of order; expected {}",
                self.next_index
            )));
        }
        self.received += payload.len() as u64;
        let allowance = self.max_bytes + (u64::from(index) + 1) * CHUNK_OVERHEAD;
        if self.received > allowance {
            return Err(Reject::PayloadTooLarge {
                size: self.received,
                limit: self.max_bytes,
            });
        }
        self.next_index += 1;
        if let Some(spool) = &mut self.spool {
            spool.chunk(index, &payload)?;
        }
        let file_id = self.meta.file_id;
        self.forward(|| FileItem::Chunk {
            file_id,
            index,
            payload: payload.clone(),
        })
        .await;
        Ok(())
    }

    /// Ends the file: it is spooled, queued for everyone subscribed (the core counts
    /// the receivers that have every chunk as sent), and its end goes to those. Returns
    /// once they have it on their wire, or were left to the spool.
    /// On an error the receivers' streams are aborted (when `self` drops).
    pub async fn finish(mut self, sha256: Bytes, mac: Bytes) -> Result<(), Reject> {
        let file_id = self.meta.file_id;
        let trailer = Arc::new(FileTrailer { sha256, mac });
        // Nobody subscribed when it was offered: nothing is kept but its id.
        let spooled = self.spool.is_some();
        if let Some(spool) = self.spool.take() {
            spool.finish(&trailer, self.durable).await?;
        }
        let done = FileDone {
            file_id,
            topic: self.meta.topic.clone(),
            timestamp_ms: self.meta.timestamp_ms,
            format: self.meta.format,
            header: self.meta.to_proto().encode_to_vec().into(),
            live: {
                let mut live: Vec<ConnId> = self.receivers.iter().map(|r| r.conn).collect();
                live.sort_unstable();
                live
            },
            spooled,
        };
        let completed = self.driver.complete_file(self.conn, done).await;
        let durable = match completed {
            Ok(Ok(durable)) => durable,
            Ok(Err(NotAccepted::Refused(reject))) => {
                // Nothing refers to the spool file: it goes before the id is given
                // back (when `self` drops), so a resend finds neither.
                if spooled {
                    self.driver.spool().remove(&self.session, &file_id);
                }
                return Err(reject);
            }
            Ok(Err(NotAccepted::NotCommitted(reject))) => {
                // Its copies are queued, so its id stays taken; the live receivers get
                // theirs from the spool, as the streams they have are not ended here.
                for receiver in self.receivers.drain(..) {
                    abort_later(receiver.port, file_id);
                }
                self.done = true;
                return Err(reject);
            }
            // Shutting down: nothing was queued, and the next start removes the file.
            Err(DriverGone) => return Err(Reject::Internal("the broker is shutting down")),
        };
        self.done = true;
        if durable && !self.durable {
            // A durable subscription matched only after the file was offered, so the
            // spool file was not synced; it is now, before the file is accepted.
            self.driver.spool().sync(&self.session, &file_id).await?;
        }

        let mut pending = Vec::new();
        for receiver in std::mem::take(&mut self.receivers) {
            let (written, wait) = oneshot::channel();
            let end = FileItem::End {
                file_id,
                trailer: trailer.clone(),
                written,
            };
            match tokio::time::timeout(SPOOL_SWITCH, receiver.port.send(end)).await {
                Ok(Ok(())) => pending.push(wait),
                Ok(Err(_)) => {}
                // Its copy is retried from the spool.
                Err(_) => abort_later(receiver.port, file_id),
            }
        }
        for wait in pending {
            let _ = tokio::time::timeout(SPOOL_SWITCH, wait).await;
        }
        Ok(())
    }

    /// Sends an item to every receiver. One that is gone is dropped; one whose port
    /// stays full for [`SPOOL_SWITCH`] is switched to the spool (its stream is aborted,
    /// and it gets the file from the spool once whole). Without a spool (nobody
    /// subscribed when the file was offered, so no receivers either) there is nothing
    /// to do.
    async fn forward(&mut self, make: impl Fn() -> FileItem) {
        let mut kept = Vec::with_capacity(self.receivers.len());
        for receiver in std::mem::take(&mut self.receivers) {
            match tokio::time::timeout(SPOOL_SWITCH, receiver.port.send(make())).await {
                Ok(Ok(())) => kept.push(receiver),
                Ok(Err(_)) => {} // the receiver's connection is gone
                Err(_) => {
                    tracing::debug!(file = %self.meta.file_id, conn = receiver.conn.0, "a receiver fell behind; switching it to the spool");
                    abort_later(receiver.port, self.meta.file_id);
                }
            }
        }
        self.receivers = kept;
    }
}

/// Aborts a file on a receiver's port once there is room (it is full when this is
/// needed), so the receiver drops the partial stream before the spool resends it.
pub fn abort_later(port: FilePort, file_id: MessageId) {
    tokio::spawn(async move {
        let abort = FileItem::Abort { file_id };
        let _ = tokio::time::timeout(RECEIVER_STALL, port.send(abort)).await;
    });
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done {
            for receiver in self.receivers.drain(..) {
                abort_later(receiver.port, self.meta.file_id);
            }
            // Its partial spool file goes first, so a resend can make a new one.
            drop(self.spool.take());
            self.driver.abandon_file(
                self.session.clone(),
                self.meta.file_id,
                self.meta.timestamp_ms,
            );
        }
    }
}

/// The native frame for a file item (QUIC streams and `/v1/ws`).
pub fn server_frame(item: &FileItem) -> ServerFrame {
    let id = |file_id: &MessageId| Bytes::copy_from_slice(file_id.as_bytes());
    let kind = match item {
        FileItem::Header(meta) => server_frame::Kind::FileHeader(meta.to_proto()),
        FileItem::Chunk {
            file_id,
            index,
            payload,
        } => server_frame::Kind::FileChunk(proto::FileChunk {
            file_id: id(file_id),
            index: *index,
            payload: payload.clone(),
        }),
        FileItem::End {
            file_id, trailer, ..
        } => server_frame::Kind::FileEnd(proto::FileEnd {
            file_id: id(file_id),
            sha256: trailer.sha256.clone(),
            mac: trailer.mac.clone(),
        }),
        FileItem::Abort { file_id } => server_frame::Kind::Error(proto::Error {
            code: proto::ErrorCode::Internal as i32,
            message: "the file transfer was aborted".into(),
            request_id: 0,
            message_id: id(file_id),
        }),
    };
    ServerFrame { kind: Some(kind) }
}

/// Encodes a frame with its length prefix (for QUIC streams).
pub fn encode(frame: &ServerFrame) -> Bytes {
    let mut buf = BytesMut::new();
    framing::encode_frame(frame, &mut buf);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_validated() {
        let good = proto::FileHeader {
            file_id: Bytes::from_static(&[1; 16]),
            topic: "files/a".into(),
            name: Bytes::from_static(b"sealed"),
            size: 10,
            chunk_size: 4,
            timestamp_ms: 5,
            format: 0,
            chunk_count: 3,
        };
        let meta = FileMeta::from_header(good.clone()).expect("valid");
        assert_eq!(
            meta.format,
            PayloadFormat::NativeV1,
            "unspecified means NATIVE_V1"
        );
        assert_eq!(meta.to_proto().chunk_count, 3);
        let mut bad = good.clone();
        bad.topic = "files/#".into();
        assert!(matches!(
            FileMeta::from_header(bad),
            Err(Refused {
                message_id: Some(_),
                ..
            })
        ));
        let mut bad = good;
        bad.file_id = Bytes::from_static(b"short");
        assert!(FileMeta::from_header(bad).is_err());
    }
}
