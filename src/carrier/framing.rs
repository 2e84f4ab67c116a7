//! Length-prefixed frames on a byte stream: a varint length, then a protobuf message.
//!
//! The decoder tells *need more bytes* (`Ok(None)`) apart from *invalid* (`Err`), and
//! checks a declared length against the limit before buffering it, so a peer cannot make
//! the broker allocate more than one frame's worth. The SDK uses the same code.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

/// Why a byte stream could not be framed or decoded. Always ends the connection with
/// `INVALID_FRAME`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The declared length is over the limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    /// The length prefix is not a valid varint.
    #[error("malformed length prefix")]
    BadLength,
    /// The bytes are not a valid protobuf message of the expected type.
    #[error("undecodable frame: {0}")]
    Decode(String),
}

impl From<prost::DecodeError> for FrameError {
    fn from(e: prost::DecodeError) -> Self {
        FrameError::Decode(e.to_string())
    }
}

/// Splits a byte stream into frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame's message bytes, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some((len, prefix)) = read_varint(&self.buf)? else {
            return Ok(None);
        };
        if len > self.max as u64 {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let len = len as usize;
        if self.buf.len() < prefix + len {
            self.buf.reserve(prefix + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(prefix);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

/// Reads a varint from the start of `buf`: `(value, bytes used)`, or `None` if `buf`
/// ends inside it.
fn read_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().take(10).enumerate() {
        if i == 9 && *byte > 1 {
            return Err(FrameError::BadLength);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 10 {
        return Err(FrameError::BadLength);
    }
    Ok(None)
}

/// Appends `message` to `out` with its length prefix.
pub fn encode_frame<M: Message>(message: &M, out: &mut BytesMut) {
    let len = message.encoded_len();
    out.reserve(len + prost::length_delimiter_len(len));
    // Writing into a BytesMut grows it as needed, so encoding cannot fail.
    let _ = message.encode_length_delimited(out);
}

/// Payloads at least this long are written after their frame's head as chunks of their
/// own, not copied into the write buffer (see [`WriteQueue::push_with_payload`]).
const SPLIT_PAYLOAD: usize = 16 * 1024;

/// What a frame's oneof field holds, as [`WriteQueue`] writes it: any prost message,
/// or a head written straight from borrowed fields (see `carrier::native`), which
/// must write what prost would write for the message it stands for.
///
/// Its methods are named apart from prost's (`encoded_len`, `encode_raw`), so that the
/// blanket impl leaves no call ambiguous where both traits are in scope.
pub trait FrameHead {
    /// Bytes [`put_head`](FrameHead::put_head) writes.
    fn head_len(&self) -> usize;
    /// Writes the fields, without a length or key of their own.
    fn put_head(&self, buf: &mut BytesMut);
}

impl<M: Message> FrameHead for M {
    fn head_len(&self) -> usize {
        self.encoded_len()
    }

    fn put_head(&self, buf: &mut BytesMut) {
        self.encode_raw(buf)
    }
}

/// Length of a `bytes` or `string` field as prost writes it (nothing if empty).
pub fn bytes_field_len(tag: u32, value: &[u8]) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    if value.is_empty() {
        return 0;
    }
    key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
}

/// Writes a `bytes` or `string` field as prost does (nothing if empty).
pub fn put_bytes_field(tag: u32, value: &[u8], buf: &mut BytesMut) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    if value.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

/// Frames queued for one stream write. Small frames are encoded into one buffer; a large
/// payload stays the `Bytes` it already is (shared with the stored message and every
/// other subscriber's queue) and goes out as a chunk of its own after its frame's head.
#[derive(Debug, Default)]
pub struct WriteQueue {
    buf: BytesMut,
    chunks: Vec<Bytes>,
    /// Bytes in `chunks`.
    chunked: usize,
}

impl WriteQueue {
    /// Queues a frame, encoded into the buffer.
    pub fn push<M: Message>(&mut self, frame: &M) {
        encode_frame(frame, &mut self.buf);
    }

    /// Queues the frame whose oneof field `field` holds `head`.
    pub fn push_head(&mut self, field: u32, head: &impl FrameHead) {
        let inner = head.head_len();
        self.put_frame_prefix(field, inner, inner);
        head.put_head(&mut self.buf);
    }

    /// Writes a frame's length and the key and length of its oneof field `field`, whose
    /// value is `inner` bytes long, and reserves room for `reserve` bytes after them.
    fn put_frame_prefix(&mut self, field: u32, inner: usize, reserve: usize) {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        let frame = key_len(field) + encoded_len_varint(inner as u64) + inner;
        let buf = &mut self.buf;
        buf.reserve(encoded_len_varint(frame as u64) + (frame - inner) + reserve);
        encode_varint(frame as u64, buf);
        encode_key(field, WireType::LengthDelimited, buf);
        encode_varint(inner as u64, buf);
    }

    /// Queues the frame whose oneof field `field` holds `hollow` with its bytes field
    /// `payload_field` set to `payload`. `hollow` must leave that field empty: it is
    /// written last, after the other fields (protobuf takes fields in any order). A
    /// payload of 16 KiB or more then follows the head as a chunk of its own, not
    /// copied; a smaller one is copied into the buffer like any frame.
    pub fn push_with_payload(
        &mut self,
        field: u32,
        hollow: &impl FrameHead,
        payload_field: u32,
        payload: &Bytes,
    ) {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        let n = payload.len();
        if n == 0 {
            // As prost writes it: an empty field is left out.
            return self.push_head(field, hollow);
        }
        let inner = hollow.head_len() + key_len(payload_field) + encoded_len_varint(n as u64) + n;
        let split = n >= SPLIT_PAYLOAD;
        let copied = if split { 0 } else { n };
        self.put_frame_prefix(field, inner, inner - n + copied);
        let buf = &mut self.buf;
        hollow.put_head(buf);
        encode_key(payload_field, WireType::LengthDelimited, buf);
        encode_varint(n as u64, buf);
        if !split {
            buf.extend_from_slice(payload);
            return;
        }
        let head = buf.split().freeze();
        self.chunked += head.len() + n;
        self.chunks.push(head);
        self.chunks.push(payload.clone());
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.buf.len() + self.chunked
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything queued, in order, as the chunks of one write. Call
    /// [`clear`](WriteQueue::clear) once they are written.
    pub fn chunks(&mut self) -> &mut [Bytes] {
        if !self.buf.is_empty() {
            let rest = self.buf.split().freeze();
            self.chunked += rest.len();
            self.chunks.push(rest);
        }
        &mut self.chunks
    }

    /// Empties the queue, keeping its buffers' capacity for the next frames.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.chunks.clear();
        self.chunked = 0;
    }
}

/// Decodes one frame's bytes as a message of type `M`.
pub fn decode<M: Message + Default>(bytes: Bytes) -> Result<M, FrameError> {
    Ok(M::decode(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        Ack, ClientFrame, Deliver, Hello, PayloadFormat, Ping, Publish, ServerFrame, Subscribe,
        client_frame, server_frame,
    };

    fn round_trip_client(frame: ClientFrame) {
        let mut out = BytesMut::new();
        encode_frame(&frame, &mut out);
        let mut d = FrameDecoder::new(1 << 20);
        // Feed byte by byte: every prefix but the whole is "need more".
        let bytes = out.freeze();
        for (i, b) in bytes.iter().enumerate() {
            d.extend(&[*b]);
            let got = d.next_frame().expect("valid");
            if i + 1 < bytes.len() {
                assert!(got.is_none());
            } else {
                let back: ClientFrame = decode(got.expect("complete")).expect("decodes");
                assert_eq!(back, frame);
            }
        }
    }

    #[test]
    fn client_frames_round_trip() {
        use client_frame::Kind;
        for kind in [
            Kind::Hello(Hello {
                protocol_version: 1,
                session: "s".into(),
                password: "p".into(),
                client_id: "c".into(),
                clean: true,
            }),
            Kind::Subscribe(Subscribe {
                request_id: 5,
                topic: "a/#".into(),
                durable: true,
                history: 3,
                presence: true,
            }),
            Kind::Publish(Publish {
                message_id: vec![1; 16].into(),
                topic: "a/b".into(),
                payload: vec![9; 300].into(),
                timestamp_ms: 1_700_000_000_000,
                format: PayloadFormat::NativeV1 as i32,
            }),
            Kind::Ack(Ack {
                message_id: vec![2; 16].into(),
            }),
            Kind::Ping(Ping { nonce: u64::MAX }),
        ] {
            round_trip_client(ClientFrame { kind: Some(kind) });
        }
    }

    #[test]
    fn server_frame_round_trip() {
        let frame = ServerFrame {
            kind: Some(server_frame::Kind::Deliver(Deliver {
                message_id: vec![3; 16].into(),
                topic: "t".into(),
                payload: vec![7; 70_000].into(),
                timestamp_ms: 1,
                format: PayloadFormat::LegacyJson as i32,
                attempt: 2,
            })),
        };
        let mut out = BytesMut::new();
        encode_frame(&frame, &mut out);
        encode_frame(&frame, &mut out);
        let mut d = FrameDecoder::new(1 << 20);
        d.extend(&out);
        for _ in 0..2 {
            let back: ServerFrame =
                decode(d.next_frame().expect("ok").expect("complete")).expect("decodes");
            assert_eq!(back, frame);
        }
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn split_frames_decode_as_the_whole_frame() {
        use crate::proto::field;
        let deliver = |payload: Bytes| Deliver {
            message_id: vec![3; 16].into(),
            topic: "a/b".into(),
            payload,
            timestamp_ms: 1_700_000_000_000,
            format: PayloadFormat::NativeV1 as i32,
            attempt: 3,
        };
        let ping = ServerFrame {
            kind: Some(server_frame::Kind::Pong(crate::proto::Pong { nonce: 9 })),
        };
        let mut q = WriteQueue::default();
        q.push(&ping);
        // A large payload, an empty one, a small one (copied), and one whose length
        // needs a 3-byte varint.
        let payloads: Vec<Bytes> = [70_000usize, 0, 100, 20_000]
            .iter()
            .map(|n| (0..*n).map(|i| i as u8).collect::<Vec<u8>>().into())
            .collect();
        for p in &payloads {
            q.push_with_payload(
                field::SERVER_DELIVER,
                &deliver(Bytes::new()),
                field::PAYLOAD,
                p,
            );
        }
        q.push(&ping);
        let chunks = q.chunks().to_vec();
        assert_eq!(q.len(), chunks.iter().map(Bytes::len).sum::<usize>());
        q.clear();
        assert!(q.is_empty() && q.chunks().is_empty());
        assert!(
            chunks.iter().any(|c| c.as_ptr() == payloads[0].as_ptr()),
            "the payload is written from its own bytes, not a copy"
        );

        let mut d = FrameDecoder::new(1 << 20);
        for c in &chunks {
            d.extend(c);
        }
        let mut next = || -> ServerFrame {
            decode(d.next_frame().expect("ok").expect("complete")).expect("decodes")
        };
        assert_eq!(next(), ping);
        for p in &payloads {
            let want = ServerFrame {
                kind: Some(server_frame::Kind::Deliver(deliver(p.clone()))),
            };
            assert_eq!(next(), want);
        }
        assert_eq!(next(), ping);
        assert_eq!(d.buffered(), 0);

        let publish = |payload: Bytes| Publish {
            message_id: vec![1; 16].into(),
            topic: "a/b".into(),
            payload,
            timestamp_ms: 5,
            format: PayloadFormat::LegacyJson as i32,
        };
        let payload = Bytes::from(vec![7u8; SPLIT_PAYLOAD]);
        q.push_with_payload(
            field::CLIENT_PUBLISH,
            &publish(Bytes::new()),
            field::PAYLOAD,
            &payload,
        );
        for c in q.chunks() {
            d.extend(c);
        }
        let back: ClientFrame =
            decode(d.next_frame().expect("ok").expect("complete")).expect("decodes");
        assert_eq!(
            back,
            ClientFrame {
                kind: Some(client_frame::Kind::Publish(publish(payload)))
            }
        );
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut d = FrameDecoder::new(1024);
        d.extend(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // 4 GiB declared
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                max: 1024
            })
        );
    }

    #[test]
    fn malformed_varint_is_refused() {
        let mut d = FrameDecoder::new(1024);
        d.extend(&[0x80; 10]);
        assert_eq!(d.next_frame(), Err(FrameError::BadLength));
        let mut d = FrameDecoder::new(1024);
        d.extend(&[0x80; 5]);
        assert_eq!(d.next_frame(), Ok(None), "could still be a valid prefix");
    }

    #[test]
    fn garbage_does_not_decode() {
        let mut d = FrameDecoder::new(1024);
        d.extend(&[4, 0xff, 0xff, 0xff, 0xff]);
        let bytes = d.next_frame().expect("framed").expect("complete");
        assert!(decode::<ClientFrame>(bytes).is_err());
    }
}
