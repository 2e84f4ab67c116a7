//! Ids and names that cannot be built invalid: every value a peer sends is parsed into
//! one of these once, at the edge, and the rest of the broker trusts it.

use std::fmt;
use std::sync::Arc;

/// Milliseconds since the Unix epoch. The core never reads a clock; callers pass `now`.
pub type Millis = u64;

/// `a - b`, signed, saturating at `i64`'s bounds: the skew between a timestamp a peer
/// chose (any `u64`, where `as i64` arithmetic overflows) and a clock of ours.
pub fn skew_ms(a: Millis, b: Millis) -> i64 {
    (i128::from(a) - i128::from(b)).clamp(i64::MIN.into(), i64::MAX.into()) as i64
}

/// The hash maps and sets of the hot path: foldhash instead of SipHash (several times
/// faster on 16-byte ids), still keyed at random per process, so a client cannot pick
/// ids that collide.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// Longest session name accepted.
pub const MAX_SESSION_NAME: usize = 128;
/// Longest client id accepted.
pub const MAX_CLIENT_ID: usize = 256;

/// Why a name or id was refused. Converted to `INVALID_FRAME` (or HTTP 400) at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The value is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// The value is longer than allowed.
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    /// The value holds a character that is not allowed.
    #[error("{what} contains an invalid character {ch:?}")]
    BadChar { what: &'static str, ch: char },
    /// A topic filter's wildcard is misplaced.
    #[error("invalid wildcard in {0:?}: '+' and '#' must fill a whole level, '#' only the last")]
    BadWildcard(String),
    /// A topic name holds a wildcard.
    #[error("topic names cannot contain wildcards ('+' or '#')")]
    WildcardInName,
    /// An id has the wrong length.
    #[error("{what} must be {expected} bytes, got {got}")]
    BadIdLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

/// A session (tenant) name: 1–128 characters from `[A-Za-z0-9_.-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionName(Arc<str>);

impl SessionName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty("session name"));
        }
        if s.len() > MAX_SESSION_NAME {
            return Err(NameError::TooLong {
                what: "session name",
                max: MAX_SESSION_NAME,
            });
        }
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(NameError::BadChar {
                what: "session name",
                ch,
            });
        }
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client identity inside a session: 1–256 printable characters, no control characters.
/// Durable subscriptions are keyed by it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(Arc<str>);

impl ClientId {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty("client id"));
        }
        if s.len() > MAX_CLIENT_ID {
            return Err(NameError::TooLong {
                what: "client id",
                max: MAX_CLIENT_ID,
            });
        }
        if let Some(ch) = s.chars().find(|c| c.is_control()) {
            return Err(NameError::BadChar {
                what: "client id",
                ch,
            });
        }
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A 16-byte message (or file) id chosen by the publisher.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, NameError> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| NameError::BadIdLength {
            what: "message_id",
            expected: 16,
            got: bytes.len(),
        })?;
        Ok(Self(arr))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

/// A connection handle, unique for the life of the process, assigned by the carrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    )*};
}
display_as_str!(SessionName, ClientId);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names() {
        assert!(SessionName::parse("my_chat-room.1").is_ok());
        assert_eq!(
            SessionName::parse(""),
            Err(NameError::Empty("session name"))
        );
        assert!(matches!(
            SessionName::parse("a/b"),
            Err(NameError::BadChar { ch: '/', .. })
        ));
        assert!(SessionName::parse(&"x".repeat(129)).is_err());
    }

    #[test]
    fn client_ids() {
        assert!(ClientId::parse("alice@example.com").is_ok());
        assert!(ClientId::parse("tab\there").is_err());
        assert!(ClientId::parse("").is_err());
    }

    #[test]
    fn message_ids() {
        assert!(MessageId::from_slice(&[7; 16]).is_ok());
        assert!(matches!(
            MessageId::from_slice(&[7; 15]),
            Err(NameError::BadIdLength { got: 15, .. })
        ));
        assert_eq!(
            MessageId([0xab; 16]).to_string(),
            "abababababababababababababababab"
        );
    }
}
