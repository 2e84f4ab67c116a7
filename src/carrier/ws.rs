//! Protobuf over WebSocket (`/v1/ws`): the native frames, one per binary message, with
//! no length prefix — for clients that cannot use QUIC (browsers without WebTransport,
//! networks that block UDP). Same requests, same answers as the QUIC control stream.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use bytes::BytesMut;
use futures::stream::StreamExt;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::core::Reject;
use crate::proto::ClientFrame;

use super::websocket::{self, Encoder, IDLE_TIMEOUT, Incoming};
use super::{Link, LinkContext, Outbound, Request, native};

/// Serves one `/v1/ws` connection.
pub async fn serve(socket: WebSocket, peer: SocketAddr, ctx: Arc<LinkContext>) {
    let (sink, mut stream) = socket.split();
    let capacity = ctx.limits.outbound_capacity(ctx.driver.core_config());
    let hello_timeout = ctx.limits.hello_timeout;
    let (tx, rx) = mpsc::channel(capacity);
    let mut link = Link::new(ctx, peer.ip(), false, tx);
    let writer = tokio::spawn(websocket::write_loop(
        sink,
        rx,
        NativeEncoder,
        link.publish_slots(),
        link.kick(),
    ));

    let hello_deadline = Instant::now() + hello_timeout;
    loop {
        let deadline = if link.is_attached() {
            Instant::now() + IDLE_TIMEOUT
        } else {
            hello_deadline
        };
        let message = match websocket::next_message(&mut stream, deadline).await {
            Incoming::Message(message) => message,
            Incoming::Gone => break,
            Incoming::TimedOut if link.is_attached() => {
                link.fail(Reject::InvalidFrame("idle for 60 s".into()))
                    .await;
                break;
            }
            Incoming::TimedOut => {
                link.fail(Reject::InvalidFrame(
                    "no successful Hello within 5 s".into(),
                ))
                .await;
                break;
            }
        };
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
    link.close().await;
    let _ = writer.await;
}

/// One `ServerFrame` per binary message.
struct NativeEncoder;

impl Encoder for NativeEncoder {
    fn encode(&mut self, item: &Outbound) -> Vec<Message> {
        let frame = native::server_frame(item);
        let mut buf = BytesMut::with_capacity(frame.encoded_len());
        // Encoding into a growable buffer cannot fail.
        let _ = frame.encode(&mut buf);
        vec![Message::Binary(buf.freeze())]
    }
}
