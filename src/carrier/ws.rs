//! Protobuf over WebSocket (`/v1/ws`): the native frames, one per binary message, with
//! no length prefix — for clients that cannot use QUIC (browsers without WebTransport,
//! networks that block UDP). Same requests, same answers as the QUIC control stream;
//! file transfers are multiplexed on the connection by `file_id` (design §3).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use bytes::BytesMut;
use prost::Message as _;

use crate::core::{MessageId, Reject};
use crate::proto::{ClientFrame, ServerFrame, client_frame::Kind};

use super::files::{self, FileItem, FileMeta};
use super::request::Refused;
use super::uploads::OpenUploads;
use super::websocket::{self, Encoder};
use super::{Link, LinkContext, Outbound, Request, native};

/// Serves one `/v1/ws` connection.
pub async fn serve(socket: WebSocket, peer: SocketAddr, ctx: Arc<LinkContext>) {
    let (mut connection, mut link) =
        websocket::Connection::open(socket, peer.ip(), ctx, false, NativeEncoder, "Hello");

    let mut uploads = OpenUploads::new(MessageId::to_string);
    while let Some(message) = connection.next(&link).await {
        if !uploads.is_empty() {
            // Boxed, as the file frames below: rare paths that would otherwise make
            // every connection's reader task larger.
            Box::pin(uploads.drop_idle(&link)).await;
        }
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
        if let Some(Kind::FileHeader(_) | Kind::FileChunk(_) | Kind::FileEnd(_)) = frame.kind {
            Box::pin(file_frame(&mut uploads, &mut link, frame)).await;
            continue;
        }
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
    // Uploads cut short give their ids back before the close's linger.
    drop(uploads);
    connection.close(link).await;
}

/// Handles a file frame of the uploads multiplexed on this connection by `file_id`.
async fn file_frame(uploads: &mut OpenUploads, link: &mut Link, frame: ClientFrame) {
    let result = match frame.kind {
        Some(Kind::FileHeader(header)) => match FileMeta::from_header(header) {
            Ok(meta) => uploads.open(link, meta).await,
            Err(refused) => Err(refused),
        },
        Some(Kind::FileChunk(chunk)) => match file_id(&chunk.file_id) {
            Ok(id) => uploads.chunk(id, chunk.index, chunk.payload).await,
            Err(refused) => Err(refused),
        },
        Some(Kind::FileEnd(end)) => match file_id(&end.file_id) {
            Ok(id) => uploads.finish(link, id, end.sha256, end.mac).await,
            Err(refused) => Err(refused),
        },
        _ => return,
    };
    if let Err(refused) = result {
        link.refuse(refused).await;
    }
}

fn file_id(raw: &[u8]) -> Result<MessageId, Refused> {
    MessageId::from_slice(raw).map_err(|e| Refused::new(e.into()))
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
