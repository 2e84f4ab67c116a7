//! Protobuf over WebSocket (`/v1/ws`): the native frames, one per binary message, with
//! no length prefix — for clients that cannot use QUIC (browsers without WebTransport,
//! networks that block UDP). Same requests, same answers as the QUIC control stream;
//! file transfers are multiplexed on the connection by `file_id` (design §3).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use bytes::BytesMut;
use prost::Message as _;

use crate::core::{MessageId, Reject};
use crate::proto::{self, ClientFrame, ServerFrame, client_frame::Kind};

use super::files::{self, FileItem, FileMeta, Upload};
use super::request::Refused;
use super::websocket::{self, Encoder};
use super::{Link, LinkContext, Outbound, Request, native};

/// Serves one `/v1/ws` connection.
pub async fn serve(socket: WebSocket, peer: SocketAddr, ctx: Arc<LinkContext>) {
    let (mut connection, mut link) =
        websocket::Connection::open(socket, peer.ip(), ctx, false, NativeEncoder, "Hello");

    let mut uploads = Uploads::default();
    while let Some(message) = connection.next(&link).await {
        let bytes = match message {
            Message::Binary(bytes) => bytes,
            Message::Text(_) => {
                let reject =
                    Reject::InvalidFrame("/v1/ws carries binary protobuf frames, not text".into());
                link.fail(reject).await;
                break;
            }
            _ => continue, // pings and pongs only count as activity
        };
        let frame = match ClientFrame::decode(bytes) {
            Ok(frame) => frame,
            Err(e) => {
                link.fail(Reject::InvalidFrame(format!("undecodable frame: {e}")))
                    .await;
                break;
            }
        };
        let frame = match uploads.take(&mut link, frame).await {
            Some(frame) => frame,
            None => continue,
        };
        let outcome = match Request::try_from(frame) {
            Ok(request) => link.handle(request).await,
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
    connection.close(link).await;
}

/// Most file uploads multiplexed on one connection at a time.
const MAX_UPLOADS: usize = 16;

/// File uploads multiplexed on this connection by `file_id`.
#[derive(Default)]
struct Uploads {
    open: HashMap<MessageId, Upload>,
}

impl Uploads {
    /// Handles file frames; gives any other frame back.
    async fn take(&mut self, link: &mut Link, frame: ClientFrame) -> Option<ClientFrame> {
        let result = match frame.kind {
            // A refused header leaves any upload already open under its id alone.
            Some(Kind::FileHeader(header)) => self.open(link, header).await,
            Some(Kind::FileChunk(chunk)) => self.chunk(chunk).await.inspect_err(|refused| {
                if let Some(id) = refused.message_id {
                    self.open.remove(&id); // dropping it aborts the transfer
                }
            }),
            Some(Kind::FileEnd(end)) => self.end(link, end).await,
            kind => return Some(ClientFrame { kind }),
        };
        if let Err(refused) = result {
            link.refuse(refused).await;
        }
        None
    }

    async fn open(&mut self, link: &mut Link, header: proto::FileHeader) -> Result<(), Refused> {
        let meta = FileMeta::from_header(header)?;
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
        if self.open.contains_key(&file_id) {
            return Err(refused(Reject::Replayed));
        }
        let upload = Upload::open(link.driver(), conn, meta)
            .await
            .map_err(refused)?;
        self.open.insert(file_id, upload);
        Ok(())
    }

    fn upload(&mut self, raw_id: &[u8]) -> Result<(MessageId, &mut Upload), Refused> {
        let id = MessageId::from_slice(raw_id).map_err(|e| Refused::new(e.into()))?;
        match self.open.get_mut(&id) {
            Some(upload) => Ok((id, upload)),
            None => Err(Refused::for_message(id)(Reject::NotFound(format!(
                "no open file upload {id}"
            )))),
        }
    }

    async fn chunk(&mut self, chunk: proto::FileChunk) -> Result<(), Refused> {
        let (id, upload) = self.upload(&chunk.file_id)?;
        upload
            .chunk(chunk.index, chunk.payload)
            .await
            .map_err(Refused::for_message(id))
    }

    async fn end(&mut self, link: &mut Link, end: proto::FileEnd) -> Result<(), Refused> {
        let (id, _) = self.upload(&end.file_id)?;
        if let Some(upload) = self.open.remove(&id) {
            upload
                .finish(end.sha256, end.mac)
                .await
                .map_err(Refused::for_message(id))?;
            link.file_accepted(id).await;
        }
        Ok(())
    }
}

/// One `ServerFrame` per binary message.
struct NativeEncoder;

fn binary(frame: ServerFrame) -> Message {
    let mut buf = BytesMut::with_capacity(frame.encoded_len());
    // Encoding into a growable buffer cannot fail.
    let _ = frame.encode(&mut buf);
    Message::Binary(buf.freeze())
}

impl Encoder for NativeEncoder {
    fn encode(&mut self, item: &Outbound) -> Vec<Message> {
        vec![binary(native::server_frame(item))]
    }

    fn encode_file(&mut self, item: &FileItem) -> Vec<Message> {
        vec![binary(files::server_frame(item))]
    }
}
