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
