//! Topic names, topic filters (MQTT-style `+`/`#` wildcards) and the subscription trie.
//!
//! Each session owns its own [`TopicTree`], so tenant isolation is structural: a filter
//! in one session is never even looked at for another session's topic.

use std::fmt;
use std::sync::Arc;

use super::types::{FastMap, NameError};

/// Longest topic name or filter, in bytes. The end-to-end MAC encodes the topic's length
/// as a u16, and no real topic comes close to this.
pub const MAX_TOPIC_LEN: usize = 1024;
/// Most levels in a topic or filter.
pub const MAX_TOPIC_LEVELS: usize = 32;

/// A concrete topic a message is published to: `/`-separated levels, no wildcards.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

/// A subscription filter: levels, `+` for exactly one level, `#` (last) for any number
/// of levels including none.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(Arc<str>);

fn check_common(s: &str, what: &'static str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty(what));
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(NameError::TooLong {
            what,
            max: MAX_TOPIC_LEN,
        });
    }
    if let Some(ch) = s.chars().find(|c| c.is_control()) {
        return Err(NameError::BadChar { what, ch });
    }
    if s.bytes().filter(|&b| b == b'/').count() >= MAX_TOPIC_LEVELS {
        return Err(NameError::TooLong {
            what: "topic levels",
            max: MAX_TOPIC_LEVELS,
        });
    }
    Ok(())
}

impl TopicName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        Self::check(s)?;
        Ok(Self(s.into()))
    }

    /// Whether `s` would parse, without keeping it (the SDK checks each topic it
    /// publishes to before sealing; the broker parses it again on arrival).
    pub fn check(s: &str) -> Result<(), NameError> {
        check_common(s, "topic")?;
        if s.contains(['+', '#']) {
            return Err(NameError::WildcardInName);
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TopicFilter {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        check_common(s, "topic filter")?;
        let mut levels = s.split('/').peekable();
        while let Some(level) = levels.next() {
            let last = levels.peek().is_none();
            let ok = match level {
                "#" => last,
                "+" => true,
                l => !l.contains(['+', '#']),
            };
            if !ok {
                return Err(NameError::BadWildcard(s.to_owned()));
            }
        }
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` matches this filter. Topics whose first level starts with `$`
    /// are reserved and only matched by filters that name that level literally.
    pub fn matches(&self, topic: &TopicName) -> bool {
        self.matches_str(&topic.0)
    }

    /// [`TopicFilter::matches`] for a topic that was validated elsewhere (the SDK matches
    /// the topics of deliveries the broker already checked, without re-parsing them).
    pub fn matches_str(&self, topic: &str) -> bool {
        // Most filters name their topic exactly.
        if *self.0 == *topic {
            return true;
        }
        let mut f = self.0.split('/');
        let mut t = topic.split('/');
        let mut first = true;
        loop {
            match (f.next(), t.next()) {
                (Some("#"), tl) => return !(first && tl.is_some_and(|l| l.starts_with('$'))),
                (Some("+"), Some(tl)) => {
                    if first && tl.starts_with('$') {
                        return false;
                    }
                }
                (Some(fl), Some(tl)) if fl == tl => {}
                (None, None) => return true,
                _ => return false,
            }
            first = false;
        }
    }
}

macro_rules! topic_fmt {
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
topic_fmt!(TopicName, TopicFilter);

/// A trie of filters → subscriber values, one node per level, with separate branches for
/// `+` and `#` (after NATS's `sublist.go`). Matching walks only the branches a topic can
/// reach, so its cost grows with the topic's depth, not with the number of filters.
#[derive(Debug)]
pub struct TopicTree<V> {
    root: Node<V>,
    len: usize,
}

/// The levels of a topic still to match, in order.
type Levels<'a> = std::str::Split<'a, char>;

#[derive(Debug)]
struct Node<V> {
    literal: FastMap<Box<str>, Node<V>>,
    single: Option<Box<Node<V>>>,
    /// Values of filters ending in `#` at this level.
    multi: Vec<V>,
    /// Values of filters ending exactly at this level.
    exact: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            literal: FastMap::default(),
            single: None,
            multi: Vec::new(),
            exact: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.single.is_none()
            && self.multi.is_empty()
            && self.exact.is_empty()
    }
}

impl<V> Default for TopicTree<V> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V: PartialEq> TopicTree<V> {
    /// Number of (filter, value) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `value` under `filter`. Adding the same pair twice keeps one copy.
    pub fn insert(&mut self, filter: &TopicFilter, value: V) {
        let mut node = &mut self.root;
        let mut levels = filter.as_str().split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                break;
            }
            node = match level {
                "+" => node.single.get_or_insert_with(Box::default),
                l => node.literal.entry(l.into()).or_default(),
            };
            if levels.peek().is_none() {
                return Self::push(&mut node.exact, value, &mut self.len);
            }
        }
        Self::push(&mut node.multi, value, &mut self.len)
    }

    fn push(list: &mut Vec<V>, value: V, len: &mut usize) {
        if !list.contains(&value) {
            list.push(value);
            *len += 1;
        }
    }

    /// Removes `value` from under `filter`; returns whether it was there. Empty branches
    /// are pruned so the tree does not grow with churn.
    pub fn remove(&mut self, filter: &TopicFilter, value: &V) -> bool {
        let levels: Vec<&str> = filter.as_str().split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<V>, levels: &[&str], value: &V) -> bool {
        let take = |list: &mut Vec<V>| match list.iter().position(|v| v == value) {
            Some(i) => {
                list.swap_remove(i);
                true
            }
            None => false,
        };
        match levels {
            [] => take(&mut node.exact),
            ["#"] => take(&mut node.multi),
            [level, rest @ ..] => {
                if *level == "+" {
                    let Some(child) = node.single.as_mut() else {
                        return false;
                    };
                    let removed = Self::remove_at(child, rest, value);
                    if child.is_empty() {
                        node.single = None;
                    }
                    removed
                } else {
                    let Some(child) = node.literal.get_mut(*level) else {
                        return false;
                    };
                    let removed = Self::remove_at(child, rest, value);
                    if child.is_empty() {
                        node.literal.remove(*level);
                    }
                    removed
                }
            }
        }
    }

    /// Calls `visit` for every value whose filter matches `topic`. A value registered
    /// under several matching filters is visited once per filter; callers dedupe.
    pub fn for_each_match(&self, topic: &TopicName, mut visit: impl FnMut(&V)) {
        let reserved = topic.as_str().starts_with('$');
        Self::walk(&self.root, topic.as_str().split('/'), reserved, &mut visit);
    }

    /// Walks the branches `levels` can reach. The level iterator is cloned where the
    /// walk forks (literal and `+`), so matching allocates nothing per publish.
    fn walk(node: &Node<V>, mut levels: Levels<'_>, reserved: bool, visit: &mut impl FnMut(&V)) {
        if !reserved {
            node.multi.iter().for_each(&mut *visit);
        }
        let Some(level) = levels.next() else {
            node.exact.iter().for_each(visit);
            return;
        };
        if let Some(child) = node.literal.get(level) {
            Self::walk(child, levels.clone(), false, visit);
        }
        if !reserved && let Some(child) = &node.single {
            Self::walk(child, levels, false, visit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TopicName {
        TopicName::parse(s).expect("valid topic")
    }
    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).expect("valid filter")
    }

    const TABLE: &[(&str, &str, bool)] = &[
        ("a/b/c", "a/b/c", true),
        ("a/b/c", "a/b", false),
        ("a/b", "a/b/c", false),
        ("a/+/c", "a/b/c", true),
        ("a/+/c", "a/b/d", false),
        ("a/+", "a/b/c", false),
        ("+/+", "a/b", true),
        ("+", "a", true),
        ("+", "a/b", false),
        ("a/#", "a", true),
        ("a/#", "a/b", true),
        ("a/#", "a/b/c/d", true),
        ("a/#", "b/a", false),
        ("#", "anything/at/all", true),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("$SYS/#", "$SYS/x", true),
        ("a/+/#", "a/b", true),
        ("a/+/#", "a", false),
        ("chat/room1", "chat/room10", false),
        ("a//b", "a//b", true),
        ("a/+/b", "a//b", true),
    ];

    #[test]
    fn filter_matches_table() {
        for (f, t, want) in TABLE {
            assert_eq!(filter(f).matches(&name(t)), *want, "{f} vs {t}");
        }
    }

    #[test]
    fn tree_agrees_with_matches() {
        let mut tree = TopicTree::default();
        for (i, (f, _, _)) in TABLE.iter().enumerate() {
            tree.insert(&filter(f), i);
        }
        for (i, (f, t, want)) in TABLE.iter().enumerate() {
            let mut hits = Vec::new();
            tree.for_each_match(&name(t), |v| hits.push(*v));
            assert_eq!(hits.contains(&i), *want, "{f} vs {t}");
            // Every hit must be a filter that really matches.
            for h in hits {
                assert!(filter(TABLE[h].0).matches(&name(t)));
            }
        }
    }

    #[test]
    fn insert_is_idempotent_and_remove_prunes() {
        let mut tree = TopicTree::default();
        tree.insert(&filter("a/+/c"), 1);
        tree.insert(&filter("a/+/c"), 1);
        tree.insert(&filter("a/#"), 2);
        assert_eq!(tree.len(), 2);
        assert!(tree.remove(&filter("a/+/c"), &1));
        assert!(!tree.remove(&filter("a/+/c"), &1));
        assert!(tree.remove(&filter("a/#"), &2));
        assert!(tree.is_empty());
        assert!(tree.root.is_empty(), "empty branches are pruned");
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert_eq!(TopicName::parse("a/+"), Err(NameError::WildcardInName));
        assert!(TopicName::parse("").is_err());
        assert!(TopicName::parse("a\u{0}b").is_err());
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b#").is_err());
        assert!(TopicFilter::parse("a+/b").is_err());
        assert!(TopicFilter::parse(&"a/".repeat(40)).is_err());
        assert!(TopicName::parse(&"x".repeat(MAX_TOPIC_LEN + 1)).is_err());
        assert!(TopicFilter::parse("#").is_ok());
    }

    #[test]
    fn check_agrees_with_parse() {
        let long = "x".repeat(MAX_TOPIC_LEN + 1);
        let deep = "a/".repeat(MAX_TOPIC_LEVELS);
        for s in ["a/b", "a/+", "a/#", "", "a\u{0}b", "$SYS/x", &long, &deep] {
            assert_eq!(
                TopicName::check(s),
                TopicName::parse(s).map(|_| ()),
                "{s:?}"
            );
        }
    }
}
