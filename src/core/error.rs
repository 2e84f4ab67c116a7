//! What a client can cause: every refusal the broker sends back, and its protocol code.

use crate::proto::ErrorCode;

use super::types::NameError;

/// A refusal of a well-formed request, or a broken frame. Carriers turn it into an
/// `Error` frame (or the legacy bridge's `{"type":"error"}`, or an HTTP status). Most
/// leave the connection open (a refused `Hello` may be tried again on it); those that
/// end it are undecodable bytes ([`Reject::InvalidFrame`] from the framing), no `Hello`
/// by the deadline, a failed legacy `init` (close code 1008), [`Reject::TakenOver`],
/// the session being suspended, a client that stops reading or goes silent
/// ([`Reject::LimitExceeded`]) and the broker shutting down ([`Reject::Internal`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// A frame arrived before `Hello` succeeded.
    #[error("not authenticated: send Hello first")]
    NotAuthenticated,
    /// Unknown session or wrong password (deliberately not told apart).
    #[error("unknown session or wrong password")]
    BadCredentials,
    /// The session is suspended by an administrator.
    #[error("session is suspended")]
    SessionSuspended,
    /// The message id was already accepted within the replay window.
    #[error("message id already accepted (replay)")]
    Replayed,
    /// The publish's timestamp is too far from the broker's clock.
    #[error("timestamp is {skew_ms} ms from the broker's clock; the window is ±{window_ms} ms")]
    StaleTimestamp { skew_ms: i64, window_ms: u64 },
    /// The payload is over the session's limit.
    #[error("payload of {size} bytes is over the limit of {limit} bytes")]
    PayloadTooLarge { size: u64, limit: u64 },
    /// Too many requests.
    #[error("rate limited: {0}")]
    RateLimited(&'static str),
    /// The frame is malformed or a field is invalid.
    #[error("invalid frame: {0}")]
    InvalidFrame(String),
    /// The request names something that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The client speaks a protocol version this broker does not.
    #[error("unsupported protocol version {0}; this broker speaks version 1")]
    UnsupportedVersion(u32),
    /// Another connection took over this client id.
    #[error("another connection with the same client_id took over")]
    TakenOver,
    /// A limit was reached.
    #[error("limit exceeded: {0}")]
    LimitExceeded(&'static str),
    /// The broker failed (storage, shutdown); the request may be retried.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Reject {
    /// An offer of a file whose upload is still under way. Not `Replayed`: that upload
    /// may yet fail, and `REPLAYED` means "already accepted" (design §4).
    pub const UPLOAD_UNDER_WAY: Reject = Reject::RateLimited(
        "this file is being uploaded on another stream; send it again once that upload ends",
    );

    /// The protocol's code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Reject::NotAuthenticated | Reject::BadCredentials => ErrorCode::Unauthenticated,
            Reject::SessionSuspended => ErrorCode::SessionSuspended,
            Reject::Replayed => ErrorCode::Replayed,
            Reject::StaleTimestamp { .. } => ErrorCode::StaleTimestamp,
            Reject::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Reject::RateLimited(_) => ErrorCode::RateLimited,
            Reject::InvalidFrame(_) => ErrorCode::InvalidFrame,
            Reject::NotFound(_) => ErrorCode::NotFound,
            Reject::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Reject::TakenOver => ErrorCode::TakenOver,
            Reject::LimitExceeded(_) => ErrorCode::LimitExceeded,
            Reject::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<NameError> for Reject {
    fn from(e: NameError) -> Self {
        Reject::InvalidFrame(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        assert_eq!(Reject::Replayed.code(), ErrorCode::Replayed);
        assert_eq!(Reject::BadCredentials.code(), ErrorCode::Unauthenticated);
        let r = Reject::PayloadTooLarge {
            size: 11,
            limit: 10,
        };
        assert_eq!(r.code(), ErrorCode::PayloadTooLarge);
        assert_eq!(
            r.to_string(),
            "payload of 11 bytes is over the limit of 10 bytes"
        );
        let n: Reject = NameError::WildcardInName.into();
        assert_eq!(n.code(), ErrorCode::InvalidFrame);
    }
}
