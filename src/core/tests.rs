//! Scenario tests of the core on a fake clock, with the in-memory store's tables
//! standing in for the database (after quinn-proto's `Pair` harness).

use std::collections::HashMap;

use bytes::Bytes;

use super::*;
use crate::proto::{PayloadFormat, PresenceEvent, PubAckStatus};
use crate::store::BacklogPage;
use crate::store::memory::MemoryState;

const T0: Millis = 1_700_000_000_000;

struct Pair {
    core: Core,
    now: Millis,
    store: MemoryState,
    inbox: HashMap<ConnId, Vec<Event>>,
    closed: HashMap<ConnId, Reject>,
    next_conn: u64,
    next_id: u8,
    /// When set, the next batch fails instead of committing.
    fail_next_commit: bool,
    /// When set, batches wait in `held` until [`Pair::commit_held`], as they do while
    /// the store thread writes them.
    hold_commits: bool,
    held: Vec<StoreBatch>,
    /// When set, backlog pages are read when asked for, as the store thread reads
    /// them in order with the commits, but reach the core only at
    /// [`Pair::deliver_loads`].
    hold_loads: bool,
    held_loads: Vec<(BacklogRequest, BacklogPage)>,
    /// Files whose spool the core let go of.
    dropped_spools: Vec<MessageId>,
}

fn settings(name: &str) -> SessionSettings {
    let mut s = SessionSettings::new(SessionName::parse(name).expect("valid"));
    s.retry_interval_ms = 1_000;
    s.max_retries = 3;
    s.message_expiry_ms = 60_000;
    s.max_payload_bytes = 1024;
    s
}

fn filter(f: &str) -> TopicFilter {
    TopicFilter::parse(f).expect("valid filter")
}

impl Pair {
    fn new() -> Self {
        Self::with_config(CoreConfig::default())
    }

    /// A core whose subscribers hold `max_inflight` copies in flight and `max_queued`
    /// behind them, so that backlogs spill to the store and are read back in pages.
    fn with_limits(max_inflight: usize, max_queued: usize) -> Self {
        Self::with_config(CoreConfig {
            limits: Limits {
                max_inflight,
                max_queued,
            },
            ..CoreConfig::default()
        })
    }

    fn with_config(config: CoreConfig) -> Self {
        Self {
            core: Core::new(config),
            now: T0,
            store: MemoryState::default(),
            inbox: HashMap::new(),
            closed: HashMap::new(),
            next_conn: 1,
            next_id: 1,
            fail_next_commit: false,
            hold_commits: false,
            held: Vec::new(),
            hold_loads: false,
            held_loads: Vec::new(),
            dropped_spools: Vec::new(),
        }
    }

    /// Runs the core until it has nothing left to do, as the driver would.
    fn drive(&mut self) {
        loop {
            let mut busy = false;
            while let Some(out) = self.core.poll_output() {
                busy = true;
                match out {
                    Output::Send { conn, event } => self.inbox.entry(conn).or_default().push(event),
                    Output::Close { conn, reject } => {
                        self.closed.insert(conn, reject);
                    }
                    Output::DropSpool { file_id, .. } => self.dropped_spools.push(file_id),
                }
            }
            if let Some(batch) = self.core.take_batch() {
                busy = true;
                if self.hold_commits {
                    self.held.push(batch);
                } else if std::mem::take(&mut self.fail_next_commit) {
                    self.core.handle_commit_failed(self.now, batch.id);
                } else {
                    let dropped_files = self.store.apply(&batch);
                    self.core.handle_committed(batch.id, &dropped_files);
                }
            }
            for load in self.core.take_loads() {
                busy = true;
                let page = self.store.backlog(&load, self.now);
                if self.hold_loads {
                    self.held_loads.push((load, page));
                    continue;
                }
                let (rows, exhausted) = page;
                self.core.handle_backlog(self.now, &load, rows, exhausted);
            }
            if !busy {
                break;
            }
        }
    }

    /// The broker restarts: a new core from what the store kept, no connections.
    fn restart(&mut self) {
        let restore = self.store.restore(self.now);
        let mut fresh = Pair::with_config(self.core.config().clone());
        fresh.now = self.now;
        fresh.next_id = self.next_id;
        fresh.next_conn = self.next_conn;
        fresh.store = std::mem::take(&mut self.store);
        fresh.core.restore(restore);
        *self = fresh;
    }

    /// Hands the core the backlog pages read so far, in order, and stops holding them.
    fn deliver_loads(&mut self) {
        self.hold_loads = false;
        for (load, (rows, exhausted)) in std::mem::take(&mut self.held_loads) {
            self.core.handle_backlog(self.now, &load, rows, exhausted);
        }
        self.drive();
    }

    /// Commits the batches held so far, in order.
    fn commit_held(&mut self) {
        for batch in std::mem::take(&mut self.held) {
            let dropped_files = self.store.apply(&batch);
            self.core.handle_committed(batch.id, &dropped_files);
        }
        self.drive();
    }

    fn cmd(&mut self, command: Command) {
        self.core.handle(self.now, command);
        self.drive();
    }

    /// Moves the clock forward, firing every deadline on the way in order.
    fn advance(&mut self, ms: u64) {
        let until = self.now + ms;
        while let Some(deadline) = self.core.poll_timeout() {
            if deadline > until {
                break;
            }
            self.now = self.now.max(deadline);
            self.core.handle_timeout(self.now);
            self.drive();
        }
        self.now = until;
    }

    /// Sends a `Hello` for `client` on a new connection, whatever the answer.
    fn hello(
        &mut self,
        s: &SessionSettings,
        client: &str,
        clean: bool,
        legacy_only: bool,
    ) -> ConnId {
        // As the HTTP API would have done when the session was created.
        self.store.insert_session(&crate::store::SessionRecord {
            settings: s.clone(),
            password_hash: String::new(),
            created_at: T0,
        });
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.cmd(Command::Hello(Hello {
            conn,
            connection_id: [conn.0 as u8; 16],
            settings: s.clone(),
            client_id: ClientId::parse(client).expect("valid"),
            anonymous: false,
            clean,
            legacy_only,
        }));
        conn
    }

    fn connect_with(
        &mut self,
        s: &SessionSettings,
        client: &str,
        clean: bool,
        legacy_only: bool,
    ) -> ConnId {
        let conn = self.hello(s, client, clean, legacy_only);
        let welcome = self.take(conn);
        assert!(
            matches!(welcome.first(), Some(Event::Welcome { .. })),
            "expected Welcome first, got {welcome:?}"
        );
        // Anything after Welcome (a backlog) stays for the test to read.
        self.inbox
            .insert(conn, welcome.into_iter().skip(1).collect());
        conn
    }

    /// Unsubscribes `conn` from `f`; its events stay for the test to read.
    fn unsubscribe(&mut self, conn: ConnId, f: &str) {
        self.cmd(Command::Unsubscribe {
            conn,
            request_id: 1,
            filter: filter(f),
        });
    }

    fn connect(&mut self, s: &SessionSettings, client: &str) -> ConnId {
        self.connect_with(s, client, false, false)
    }

    fn subscribe(&mut self, conn: ConnId, f: &str, durable: bool) {
        self.cmd(Command::Subscribe {
            conn,
            request_id: 7,
            filter: filter(f),
            durable,
            presence: false,
            history: 0,
        });
        let events = self.take(conn);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Subscribed { request_id: 7 })),
            "expected Subscribed, got {events:?}"
        );
    }

    fn publish_as(
        &mut self,
        conn: ConnId,
        topic: &str,
        payload: &[u8],
        format: PayloadFormat,
        ts: Millis,
    ) -> MessageId {
        let id = MessageId([self.next_id; 16]);
        self.next_id = self.next_id.wrapping_add(1);
        self.cmd(Command::Publish {
            conn,
            publish: Publish {
                message_id: id,
                topic: TopicName::parse(topic).expect("valid"),
                payload: Bytes::copy_from_slice(payload),
                timestamp_ms: ts,
                format,
            },
        });
        id
    }

    fn publish(&mut self, conn: ConnId, topic: &str, payload: &[u8]) -> MessageId {
        self.publish_as(conn, topic, payload, PayloadFormat::NativeV1, self.now)
    }

    fn ack(&mut self, conn: ConnId, id: MessageId) {
        self.cmd(Command::Ack {
            conn,
            message_id: id,
        });
    }

    fn take(&mut self, conn: ConnId) -> Vec<Event> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    /// (payload, attempt) of every Deliver waiting for `conn`; other events are dropped.
    fn delivers(&mut self, conn: ConnId) -> Vec<(Vec<u8>, u32)> {
        self.take(conn)
            .into_iter()
            .filter_map(|e| match e {
                Event::Deliver { message, attempt } => Some((message.payload.to_vec(), attempt)),
                _ => None,
            })
            .collect()
    }

    fn puback(&mut self, conn: ConnId) -> PubAckStatus {
        let events = self.take(conn);
        match events.as_slice() {
            [Event::PubAck { status, .. }] => *status,
            other => panic!("expected one PubAck, got {other:?}"),
        }
    }

    fn error(&mut self, conn: ConnId) -> Reject {
        let events = self.take(conn);
        match events.as_slice() {
            [Event::Error(e)] => e.reject.clone(),
            other => panic!("expected one Error, got {other:?}"),
        }
    }
}

fn payloads(d: &[(Vec<u8>, u32)]) -> Vec<Vec<u8>> {
    d.iter().map(|(p, _)| p.clone()).collect()
}

#[test]
fn publish_reaches_subscriber_and_puback_reports_status() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");

    p.publish(publisher, "chat/1", b"nobody");
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);

    p.subscribe(sub, "chat/+", false);
    p.publish(publisher, "chat/1", b"hello");
    assert_eq!(p.puback(publisher), PubAckStatus::Accepted);
    assert_eq!(p.delivers(sub), vec![(b"hello".to_vec(), 1)]);
    assert_eq!(
        p.store.message_count(),
        0,
        "connection-bound copies are not written"
    );

    let durable = p.connect(&s, "dur");
    p.subscribe(durable, "chat/#", true);
    p.publish(publisher, "chat/1", b"kept");
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);
    assert_eq!(p.store.copy_count(), 1);
}

/// The answer waits for the publish's batch; when every copy was acknowledged before
/// that batch committed, it is `DELIVERED`. A copy still unacknowledged, or given up
/// without an ack, leaves it as it was.
#[test]
fn puback_is_delivered_when_every_subscriber_acked_before_the_commit() {
    let mut p = Pair::new();
    let s = settings("s"); // retry every 1 s, 3 retries
    let publisher = p.connect(&s, "pub");
    let fleeting = p.connect(&s, "fleeting");
    let durable = p.connect(&s, "durable");
    p.subscribe(fleeting, "t", false);
    p.subscribe(durable, "t", true);
    p.hold_commits = true;

    let one = p.publish(publisher, "t", b"one");
    assert!(p.take(publisher).is_empty(), "no answer before the commit");
    p.ack(fleeting, one);
    p.commit_held();
    assert_eq!(
        p.puback(publisher),
        PubAckStatus::Stored,
        "the durable subscriber has not acknowledged"
    );

    let two = p.publish(publisher, "t", b"two");
    p.ack(fleeting, two);
    p.ack(durable, two);
    p.ack(durable, two); // a duplicate counts once
    p.commit_held();
    assert_eq!(p.puback(publisher), PubAckStatus::Delivered);
    p.ack(durable, one);
    p.commit_held();
    assert!(p.take(publisher).is_empty(), "one answer per publish");

    // A copy given up unacknowledged was not delivered.
    p.cmd(Command::Unsubscribe {
        conn: durable,
        request_id: 8,
        filter: filter("t"),
    });
    p.commit_held();
    p.take(durable);
    p.take(fleeting);
    let three = p.publish(publisher, "t", b"three");
    p.advance(10_000);
    assert_eq!(p.delivers(fleeting).len(), 4, "sent, retried, given up");
    p.ack(fleeting, three);
    p.commit_held();
    assert_eq!(p.puback(publisher), PubAckStatus::Accepted);

    // A refused publish leaves nothing behind either.
    p.fail_next_commit = true;
    p.hold_commits = false;
    p.publish(publisher, "t", b"four");
    assert!(matches!(p.error(publisher), Reject::Internal(_)));
    assert!(p.core.fx.unacked.is_empty(), "no count outlives its answer");
}

/// A history replay's copies that spill are marked as such for the store: the client
/// may hold a stored copy of the same message, which the spill then stands for
/// (`store::plan::Net`). A slow connection's live copies that spill are not.
#[test]
fn a_history_replays_spills_are_marked_replayed() {
    let mut p = Pair::with_limits(1, 1);
    let mut s = settings("s");
    s.history_size = 10;
    let publisher = p.connect(&s, "pub");
    for _ in 0..4 {
        p.publish(publisher, "t", b"old");
    }
    let late = p.connect(&s, "late");
    p.hold_commits = true;
    p.subscribe_with_history(late, "t", 10);
    p.publish(publisher, "t", b"new");
    let spills: Vec<bool> = p
        .held
        .iter()
        .flat_map(|batch| &batch.ops)
        .filter_map(|op| match op {
            StoreOp::PutCopy { replayed, .. } => Some(*replayed),
            _ => None,
        })
        .collect();
    // One copy in flight, one queued, the other two old ones and the new one spilled.
    assert_eq!(spills, [true, true, false]);
}

/// A copy replayed from history to a subscription made meanwhile is not one the
/// publish made: its ack says nothing of the subscriber that has not acknowledged.
#[test]
fn a_history_replay_is_not_counted_as_delivering_the_publish() {
    let mut p = Pair::new();
    let mut s = settings("s");
    s.history_size = 10;
    let publisher = p.connect(&s, "pub");
    let slow = p.connect(&s, "slow");
    let late = p.connect(&s, "late");
    p.subscribe(slow, "t", false);
    p.hold_commits = true;

    let id = p.publish(publisher, "t", b"m");
    p.subscribe_with_history(late, "t", 10);
    assert_eq!(p.delivers(late).len(), 1, "replayed from history");
    p.ack(late, id);
    p.commit_held();
    assert_eq!(
        p.puback(publisher),
        PubAckStatus::Accepted,
        "the subscriber the publish reached has not acknowledged"
    );
}

#[test]
fn unacked_delivery_is_retried_up_to_the_limit_then_dropped() {
    let mut p = Pair::new();
    let s = settings("s"); // retry every 1 s, 3 retries
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", false);
    p.publish(publisher, "t", b"m");
    assert_eq!(p.delivers(sub), vec![(b"m".to_vec(), 1)]);

    p.advance(999);
    assert!(
        p.delivers(sub).is_empty(),
        "nothing before the retry interval"
    );
    p.advance(1);
    assert_eq!(p.delivers(sub), vec![(b"m".to_vec(), 2)]);
    p.advance(1_000);
    assert_eq!(p.delivers(sub), vec![(b"m".to_vec(), 3)]);
    p.advance(1_000);
    assert_eq!(
        p.delivers(sub),
        vec![(b"m".to_vec(), 4)],
        "last attempt is 1 + max_retries"
    );
    p.advance(10_000);
    assert!(
        p.delivers(sub).is_empty(),
        "given up after the last attempt"
    );
    assert_eq!(p.core.poll_timeout(), None);
}

#[test]
fn ack_stops_redelivery() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", true);
    let id = p.publish(publisher, "t", b"m");
    assert_eq!(p.delivers(sub).len(), 1);
    p.ack(sub, id);
    p.advance(5_000);
    assert!(p.delivers(sub).is_empty());
    assert_eq!(p.store.copy_count(), 0, "an acked durable copy is deleted");
    assert_eq!(p.store.message_count(), 0, "and so is its body");
}

/// A subscriber that acknowledges everything leaves nothing for the retry timer: once
/// the first deadline passes, the next one is a copy still in flight, not the next of
/// the copies acknowledged long ago (which made the timer fire once per publish).
#[test]
fn acknowledged_copies_leave_the_retry_timer_idle() {
    let mut p = Pair::new();
    let s = settings("s"); // retry every 1 s
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", false);
    for _ in 0..50 {
        let id = p.publish(publisher, "t", b"m");
        p.puback(publisher);
        assert_eq!(p.delivers(sub).len(), 1);
        p.ack(sub, id);
        p.advance(10);
    }
    // The first copy's deadline (1 s after it was sent), set lazily, fires once...
    let first = p.core.poll_timeout().expect("the first copy's timer");
    assert!(first <= T0 + 1_000 + 10, "{first}");
    p.now = first;
    p.core.handle_timeout(first);
    p.drive();
    // ...and then there is nothing in flight to wake for (not the second copy's
    // deadline 10 ms later, and so on for each of the 50).
    assert_eq!(p.core.poll_timeout(), None);
    p.advance(1_000);

    // With one copy unacknowledged among acknowledged ones, its deadline is next.
    let unacked = p.publish(publisher, "t", b"kept");
    p.puback(publisher);
    let sent_at = p.now;
    p.advance(10);
    for _ in 0..20 {
        let id = p.publish(publisher, "t", b"m");
        p.puback(publisher);
        p.ack(sub, id);
        p.advance(10);
    }
    assert_eq!(p.delivers(sub).len(), 21);
    assert_eq!(p.core.poll_timeout(), Some(sent_at + 1_000));
    p.advance(1_000);
    assert_eq!(p.delivers(sub), vec![(b"kept".to_vec(), 2)]);
    p.ack(sub, unacked);
    p.advance(1_000);
    assert_eq!(p.core.poll_timeout(), None);
}

#[test]
fn nothing_is_delivered_after_expiry() {
    let mut p = Pair::new();
    let mut s = settings("s");
    s.max_retries = 100;
    s.message_expiry_ms = 2_500;
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", false);
    p.publish(publisher, "t", b"m");
    p.advance(10_000);
    let attempts: Vec<u32> = p.delivers(sub).iter().map(|d| d.1).collect();
    assert_eq!(
        attempts,
        vec![1, 2, 3],
        "sent at 0, 1 s and 2 s; expired at 2.5 s"
    );
}

#[test]
fn durable_backlog_is_delivered_in_order_on_reconnect() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "orders/#", true);
    p.cmd(Command::Disconnected { conn: sub });

    for i in 0..20u8 {
        p.publish(publisher, "orders/new", &[i]);
        assert_eq!(p.puback(publisher), PubAckStatus::Stored);
    }
    assert_eq!(p.store.copy_count(), 20);

    // Back with the same client id: no Subscribe needed, backlog in accept order.
    let sub = p.connect(&s, "sub");
    let got = p.delivers(sub);
    let want: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i]).collect();
    assert_eq!(payloads(&got), want);
    assert!(
        got.iter().all(|(_, attempt)| *attempt == 1),
        "offline time uses no attempts"
    );
}

#[test]
fn attempts_survive_a_reconnect() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", true);
    p.publish(publisher, "t", b"m");
    p.advance(1_000);
    assert_eq!(
        p.delivers(sub).iter().map(|d| d.1).collect::<Vec<_>>(),
        vec![1, 2]
    );
    p.cmd(Command::Disconnected { conn: sub });
    let sub = p.connect(&s, "sub");
    assert_eq!(p.delivers(sub), vec![(b"m".to_vec(), 3)]);
}

#[test]
fn sessions_are_isolated() {
    let mut p = Pair::new();
    let (a, b) = (settings("a"), settings("b"));
    let pub_a = p.connect(&a, "pub");
    let sub_a = p.connect(&a, "sub");
    let sub_b = p.connect(&b, "sub");
    let wild_b = p.connect(&b, "wild");
    p.subscribe(sub_a, "room", false);
    p.subscribe(sub_b, "room", false);
    p.subscribe(wild_b, "#", true);
    p.publish(pub_a, "room", b"for a");
    assert_eq!(p.delivers(sub_a).len(), 1);
    assert!(p.delivers(sub_b).is_empty());
    assert!(p.delivers(wild_b).is_empty());
}

#[test]
fn overlapping_filters_give_one_delivery() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "a/#", false);
    p.subscribe(sub, "a/+", true);
    p.subscribe(sub, "a/b", false);
    p.publish(publisher, "a/b", b"once");
    assert_eq!(p.delivers(sub).len(), 1);
    assert_eq!(
        p.puback(publisher),
        PubAckStatus::Stored,
        "durable if any match is"
    );
}

#[test]
fn replayed_and_stale_publishes_are_refused() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let id = p.publish(publisher, "t", b"m");
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);
    p.cmd(Command::Publish {
        conn: publisher,
        publish: Publish {
            message_id: id,
            topic: TopicName::parse("t").expect("valid"),
            payload: Bytes::from_static(b"m"),
            timestamp_ms: p.now,
            format: PayloadFormat::NativeV1,
        },
    });
    assert_eq!(p.error(publisher), Reject::Replayed);

    let now = p.now;
    p.publish_as(
        publisher,
        "t",
        b"old",
        PayloadFormat::NativeV1,
        now - 30_001,
    );
    assert!(matches!(p.error(publisher), Reject::StaleTimestamp { .. }));
    p.publish_as(
        publisher,
        "t",
        b"future",
        PayloadFormat::NativeV1,
        now + 30_001,
    );
    assert!(matches!(p.error(publisher), Reject::StaleTimestamp { .. }));
}

#[test]
fn replay_ids_survive_a_restart() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let id = p.publish(publisher, "t", b"m");
    p.take(publisher);

    p.restart();
    let publisher = p.connect(&s, "pub");
    p.cmd(Command::Publish {
        conn: publisher,
        publish: Publish {
            message_id: id,
            topic: TopicName::parse("t").expect("valid"),
            payload: Bytes::from_static(b"m"),
            timestamp_ms: p.now,
            format: PayloadFormat::NativeV1,
        },
    });
    assert_eq!(p.error(publisher), Reject::Replayed);
}

#[test]
fn oversized_payload_is_refused() {
    let mut p = Pair::new();
    let s = settings("s"); // 1 KiB
    let publisher = p.connect(&s, "pub");
    p.publish(publisher, "t", &[0; 1025]);
    assert_eq!(
        p.error(publisher),
        Reject::PayloadTooLarge {
            size: 1025,
            limit: 1024
        }
    );
    p.publish(publisher, "t", &[0; 1024]);
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);
}

#[test]
fn a_second_connection_takes_over_the_client_id() {
    let mut p = Pair::new();
    let s = settings("s");
    let first = p.connect(&s, "dev");
    p.subscribe(first, "t", true);
    let second = p.connect(&s, "dev");
    assert_eq!(p.closed.get(&first), Some(&Reject::TakenOver));
    let publisher = p.connect(&s, "pub");
    p.publish(publisher, "t", b"m");
    assert!(p.delivers(first).is_empty());
    assert_eq!(
        p.delivers(second).len(),
        1,
        "the durable subscription moved over"
    );
}

#[test]
fn clean_start_drops_durable_state() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", true);
    p.cmd(Command::Disconnected { conn: sub });
    p.publish(publisher, "t", b"m");
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);
    let sub = p.connect_with(&s, "sub", true, false);
    assert!(p.delivers(sub).is_empty());
    assert_eq!(p.store.copy_count(), 0);
    p.publish(publisher, "t", b"m2");
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);
}

#[test]
fn unsubscribe_discards_pending_copies() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", true);
    p.publish(publisher, "t", b"m");
    assert_eq!(p.delivers(sub).len(), 1);
    p.cmd(Command::Unsubscribe {
        conn: sub,
        request_id: 9,
        filter: filter("t"),
    });
    assert!(matches!(
        p.take(sub).as_slice(),
        [Event::Unsubscribed { request_id: 9 }]
    ));
    p.advance(10_000);
    assert!(p.delivers(sub).is_empty());
    assert_eq!(p.store.copy_count(), 0);
}

#[test]
fn unsubscribe_discards_copies_not_yet_read_back_from_the_store() {
    let mut p = Pair::with_limits(2, 2);
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "a/#", true);
    p.subscribe(sub, "b", true);
    p.cmd(Command::Disconnected { conn: sub });
    for i in 0..10u8 {
        p.publish(publisher, "a/x", &[i]);
    }
    p.publish(publisher, "b", b"b");
    p.take(publisher);

    // The backlog is read a page (two copies) at a time, in order with the commits,
    // and each page reaches the core later. The client unsubscribes, and subscribes
    // again, while its first page is on its way.
    p.hold_loads = true;
    let sub = p.connect(&s, "sub");
    p.unsubscribe(sub, "a/#");
    p.subscribe(sub, "a/#", true);
    p.deliver_loads();

    assert_eq!(
        take_and_ack(&mut p, sub),
        vec![b"b".to_vec()],
        "nothing published before the unsubscribe comes back"
    );
    assert_eq!(p.store.copy_count(), 0);
    assert_eq!(p.store.message_count(), 0);
}

#[test]
fn unsubscribe_discards_a_connection_bound_subscription_s_spilled_copies() {
    let mut p = Pair::with_limits(2, 2);
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", false);
    for i in 0..10u8 {
        p.publish(publisher, "t", &[i]);
    }
    assert!(
        p.store.copy_count() > 0,
        "what memory could not hold spilled"
    );

    p.hold_loads = true;
    p.unsubscribe(sub, "t");
    p.subscribe(sub, "t", false);
    p.deliver_loads();
    assert_eq!(take_and_ack(&mut p, sub), Vec::<Vec<u8>>::new());
    assert_eq!(p.store.copy_count(), 0);
}

#[test]
fn unsubscribe_discards_durable_copies_a_connection_bound_filter_still_wanted() {
    // A message matching a durable and a connection-bound filter makes one durable
    // copy; once the durable filter goes, only the other wants it.
    let mut p = Pair::with_limits(2, 2);
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "a/#", true);
    p.subscribe(sub, "a/b", false);
    for i in 0..10u8 {
        p.publish(publisher, "a/b", &[i]);
    }
    p.unsubscribe(sub, "a/#");
    assert!(p.store.copy_count() > 0, "a/b still wants them");

    p.hold_loads = true;
    p.unsubscribe(sub, "a/b");
    p.subscribe(sub, "a/b", false);
    p.deliver_loads();
    assert_eq!(take_and_ack(&mut p, sub), Vec::<Vec<u8>>::new());
    assert_eq!(p.store.copy_count(), 0);
}

#[test]
fn durable_copies_go_with_the_connection_bound_filters_left_wanting_them() {
    for demote in [false, true] {
        let mut p = Pair::with_limits(2, 2);
        let s = settings("s");
        let publisher = p.connect(&s, "pub");
        let sub = p.connect(&s, "sub");
        p.subscribe(sub, "a/#", true);
        p.subscribe(sub, "keep", true);
        if !demote {
            p.subscribe(sub, "a/b", false);
        }
        for i in 0..10u8 {
            p.publish(publisher, "a/b", &[i]);
        }
        if demote {
            // a/# made connection-bound: its durable copies stay while it lasts.
            p.subscribe(sub, "a/#", false);
        } else {
            // a/b still wants the durable copies a/# made.
            p.unsubscribe(sub, "a/#");
        }
        assert!(p.store.copy_count() > 0, "demote: {demote}");
        p.cmd(Command::Disconnected { conn: sub });
        assert_eq!(p.store.copy_count(), 0, "demote: {demote}");

        let sub = p.connect(&s, "sub");
        p.subscribe(sub, "a/#", true);
        assert_eq!(take_and_ack(&mut p, sub), Vec::<Vec<u8>>::new());
    }
}

#[test]
fn slow_subscriber_memory_is_bounded_and_nothing_is_lost() {
    let mut p = Pair::with_limits(8, 16);
    let mut s = settings("s");
    s.retry_interval_ms = 3_600_000; // no retries during the test
    s.message_expiry_ms = 7_200_000;
    let publisher = p.connect(&s, "pub");
    let fast = p.connect(&s, "fast");
    let slow = p.connect(&s, "slow");
    p.subscribe(slow, "t", false);
    p.subscribe(fast, "t", true);

    for i in 0..200u16 {
        p.publish(publisher, "t", &i.to_be_bytes());
    }
    let sub = |p: &Pair, c: &str| {
        let session = &p.core.sessions[&SessionName::parse("s").expect("valid")];
        session.subscribers[&ClientId::parse(c).expect("valid")].in_memory()
    };
    assert!(sub(&p, "slow") <= 24, "window + queue bound memory");
    assert!(p.store.copy_count() > 0, "the rest spilled to the store");

    // Ack everything as it arrives: all 200 come, in order, exactly once each.
    for conn in [slow, fast] {
        let mut got = Vec::new();
        loop {
            let batch = p.take(conn);
            if batch.is_empty() {
                break;
            }
            for e in batch {
                if let Event::Deliver { message, attempt } = e {
                    assert_eq!(attempt, 1);
                    got.push(u16::from_be_bytes([message.payload[0], message.payload[1]]));
                    p.ack(conn, message.id);
                }
            }
        }
        assert_eq!(got, (0..200).collect::<Vec<_>>());
    }
    assert_eq!(p.store.copy_count(), 0);
    assert_eq!(p.store.message_count(), 0);
}

#[test]
fn legacy_connections_only_get_legacy_payloads() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let dart = p.connect_with(&s, "dart", false, true);
    p.subscribe(dart, "t", false);
    p.publish(publisher, "t", b"native");
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);
    let now = p.now;
    p.publish_as(publisher, "t", LEGACY_BODY, PayloadFormat::LegacyJson, now);
    assert_eq!(p.puback(publisher), PubAckStatus::Accepted);
    assert_eq!(p.delivers(dart).len(), 1);
}

/// A seed client's body, as the legacy bridge makes it.
const LEGACY_BODY: &[u8] = b"{\"data\":\"x\",\"hash\":\"y\"}";

/// Takes the messages delivered to `conn`, acknowledging each, and returns their
/// payloads.
fn take_and_ack(p: &mut Pair, conn: ConnId) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    for e in p.take(conn) {
        if let Event::Deliver { message, .. } = e {
            got.push(message.payload.to_vec());
            p.ack(conn, message.id);
        }
    }
    got
}

#[test]
fn a_legacy_connection_is_not_sent_a_native_backlog() {
    // A native connection made the client's durable subscription, and its backlog
    // holds both formats; the seed's app then logs in under the same id.
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let native = p.connect(&s, "alice");
    p.subscribe(native, "t", true);
    p.cmd(Command::Disconnected { conn: native });
    p.publish(publisher, "t", b"native");
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);
    let now = p.now;
    p.publish_as(publisher, "t", LEGACY_BODY, PayloadFormat::LegacyJson, now);
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);

    let dart = p.connect_with(&s, "alice", false, true);
    assert_eq!(take_and_ack(&mut p, dart), vec![LEGACY_BODY.to_vec()]);
    // The copy it cannot read is dropped, not kept for retries.
    assert_eq!(p.store.copy_count(), 0);
    assert_eq!(p.store.message_count(), 0);
}

#[test]
fn a_legacy_subscription_stays_legacy_across_a_restart() {
    let mut q = Pair::new();
    let s = settings("s");
    let dart = q.connect_with(&s, "dart", false, true);
    q.subscribe(dart, "t", true);
    q.cmd(Command::Disconnected { conn: dart });

    q.restart();
    let publisher = q.connect(&s, "pub");
    q.publish(publisher, "t", b"native");
    assert_eq!(
        q.puback(publisher),
        PubAckStatus::NoSubscribers,
        "nothing the offline legacy client cannot read is queued for it"
    );
    let now = q.now;
    q.publish_as(publisher, "t", LEGACY_BODY, PayloadFormat::LegacyJson, now);
    assert_eq!(q.puback(publisher), PubAckStatus::Stored);

    let dart = q.connect_with(&s, "dart", false, true);
    assert_eq!(take_and_ack(&mut q, dart), vec![LEGACY_BODY.to_vec()]);
    assert_eq!(q.store.copy_count(), 0);
}

#[test]
fn the_legacy_mark_follows_the_client_s_last_connection_across_restarts() {
    let mut p = Pair::new();
    let s = settings("s");
    let dart = p.connect_with(&s, "alice", false, true);
    p.subscribe(dart, "t", true);
    p.cmd(Command::Disconnected { conn: dart });
    // The user moves to a native app under the same id; its subscription resumes.
    let native = p.connect(&s, "alice");
    p.cmd(Command::Disconnected { conn: native });

    p.restart();
    let publisher = p.connect(&s, "pub");
    p.publish(publisher, "t", b"native");
    assert_eq!(
        p.puback(publisher),
        PubAckStatus::Stored,
        "queued for the native client"
    );
    let native = p.connect(&s, "alice");
    assert_eq!(take_and_ack(&mut p, native), vec![b"native".to_vec()]);
    p.cmd(Command::Disconnected { conn: native });

    // And back to the Dart app.
    let dart = p.connect_with(&s, "alice", false, true);
    p.cmd(Command::Disconnected { conn: dart });
    p.restart();
    let publisher = p.connect(&s, "pub");
    p.publish(publisher, "t", b"native");
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);
}

#[test]
fn failed_commit_refuses_the_publish_and_allows_a_retry() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    p.fail_next_commit = true;
    let id = p.publish(publisher, "t", b"m");
    assert!(matches!(p.error(publisher), Reject::Internal(_)));
    p.cmd(Command::Publish {
        conn: publisher,
        publish: Publish {
            message_id: id,
            topic: TopicName::parse("t").expect("valid"),
            payload: Bytes::from_static(b"m"),
            timestamp_ms: p.now,
            format: PayloadFormat::NativeV1,
        },
    });
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);
}

impl Pair {
    /// Sends a `Subscribe`; its answers stay for the test to read.
    fn send_subscribe(&mut self, conn: ConnId, f: &str, durable: bool, presence: bool) {
        self.cmd(Command::Subscribe {
            conn,
            request_id: 7,
            filter: filter(f),
            durable,
            presence,
            history: 0,
        });
    }

    /// Sends a connection-bound `Subscribe` that asks for up to `history` retained
    /// messages first.
    fn subscribe_with_history(&mut self, conn: ConnId, f: &str, history: u32) {
        self.cmd(Command::Subscribe {
            conn,
            request_id: 7,
            filter: filter(f),
            durable: false,
            presence: false,
            history,
        });
    }

    /// Sends a `Subscribe` whose batch fails, and checks that it is refused.
    fn subscribe_failing(&mut self, conn: ConnId, f: &str, durable: bool) {
        self.fail_next_commit = true;
        self.send_subscribe(conn, f, durable, false);
        assert!(matches!(self.error(conn), Reject::Internal(_)));
    }

    /// The presence changes waiting for `conn`, as (who, event).
    fn presence(&mut self, conn: ConnId) -> Vec<(String, PresenceEvent)> {
        self.take(conn)
            .into_iter()
            .filter_map(|e| match e {
                Event::Presence(p) => Some((p.client_id.as_str().to_owned(), p.event)),
                _ => None,
            })
            .collect()
    }

    /// Commits the oldest batch held.
    fn commit_oldest_held(&mut self) {
        let batch = self.held.remove(0);
        let dropped_files = self.store.apply(&batch);
        self.core.handle_committed(batch.id, &dropped_files);
        self.drive();
    }

    /// Fails the oldest batch held, as a store that could not write it would.
    fn fail_oldest_held(&mut self) {
        let batch = self.held.remove(0);
        self.core.handle_commit_failed(self.now, batch.id);
        self.drive();
    }
}

/// A durable subscription whose batch failed is refused and undone, so the client's
/// retry stores it (it had been answered at once, with nothing stored).
#[test]
fn a_failed_durable_subscribe_is_undone_and_its_retry_stored() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe_failing(sub, "t", true);
    p.publish(publisher, "t", b"none");
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);

    p.subscribe(sub, "t", true);
    p.cmd(Command::Disconnected { conn: sub });
    p.restart();
    let publisher = p.connect(&s, "pub");
    p.publish(publisher, "t", b"kept");
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);
    let sub = p.connect(&s, "sub");
    assert_eq!(payloads(&p.delivers(sub)), vec![b"kept".to_vec()]);
}

/// A failed durable `Subscribe` followed, before its batch failed, by others of the
/// same filter is settled by the last of them, not undone.
#[test]
fn a_failed_durable_subscribe_is_settled_by_a_later_one() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.hold_commits = true;
    for durable in [true, false, true] {
        p.send_subscribe(sub, "t", durable, false);
    }
    p.fail_oldest_held();
    p.commit_held();
    let answers = p.take(sub);
    assert!(
        matches!(answers[0], Event::Subscribed { .. }),
        "{answers:?}"
    );
    assert!(matches!(&answers[1], Event::Error(e) if matches!(e.reject, Reject::Internal(_))));
    assert!(
        matches!(answers[2], Event::Subscribed { .. }),
        "{answers:?}"
    );
    assert_eq!(p.store.subscription_count(), 1);
    p.hold_commits = false;
    p.publish(publisher, "t", b"kept");
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);
}

/// A durable `Subscribe` sent again while the first waits for its batch (a client
/// resending, or reconnecting) waits for the store too, and settles the filter.
#[test]
fn a_durable_subscribe_resent_while_uncommitted_waits_for_the_store() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.hold_commits = true;
    p.send_subscribe(sub, "t", true, false);
    p.send_subscribe(sub, "t", true, false);
    assert!(
        p.take(sub).is_empty(),
        "neither is answered before a commit"
    );
    p.fail_oldest_held();
    assert!(matches!(p.error(sub), Reject::Internal(_)));
    p.commit_held();
    assert!(matches!(p.take(sub).as_slice(), [Event::Subscribed { .. }]));
    assert_eq!(p.store.subscription_count(), 1);
    p.hold_commits = false;
    p.publish(publisher, "t", b"kept");
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);
    assert_eq!(payloads(&p.delivers(sub)), vec![b"kept".to_vec()]);

    // Both fail: the filter is gone, in memory as in the store.
    p.hold_commits = true;
    p.send_subscribe(sub, "u", true, false);
    p.send_subscribe(sub, "u", true, false);
    p.fail_oldest_held();
    p.fail_oldest_held();
    p.commit_held();
    assert_eq!(p.take(sub).len(), 2, "two refusals");
    p.hold_commits = false;
    p.publish(publisher, "u", b"none");
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);

    // The first is stored, the second fails: it stays stored.
    p.hold_commits = true;
    p.send_subscribe(sub, "v", true, false);
    p.send_subscribe(sub, "v", true, false);
    p.commit_oldest_held();
    p.fail_oldest_held();
    p.hold_commits = false;
    assert_eq!(p.store.subscription_count(), 2);
    p.publish(publisher, "v", b"kept too");
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);
}

/// A durable `Subscribe` stored, then undone by a connection-bound one, then made
/// again in a batch that fails: the first's commit does not count for the last, and
/// the filter goes back to connection-bound, in memory as in the store.
#[test]
fn a_stored_subscription_deleted_since_does_not_count_for_a_failed_one() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.hold_commits = true;
    for durable in [true, false, true] {
        p.send_subscribe(sub, "t", durable, false);
    }
    p.commit_oldest_held();
    p.commit_oldest_held();
    p.fail_oldest_held();
    p.commit_held();
    p.hold_commits = false;
    p.take(sub);
    assert_eq!(p.store.subscription_count(), 0);
    p.publish(publisher, "t", b"live");
    assert_eq!(p.puback(publisher), PubAckStatus::Accepted);
}

/// The connection-bound filter a durable `Subscribe` replaced belonged to the
/// connection that sent it: a failure after another connection took the client
/// over (and re-sent the `Subscribe`) does not hand it to that one.
#[test]
fn a_failed_upgrade_does_not_hand_its_old_filter_to_a_new_connection() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let first = p.connect(&s, "sub");
    p.subscribe(first, "t", false);
    p.hold_commits = true;
    p.send_subscribe(first, "t", true, false);
    p.cmd(Command::Disconnected { conn: first });
    let second = p.connect(&s, "sub");
    p.send_subscribe(second, "t", true, false);
    p.fail_oldest_held();
    p.fail_oldest_held();
    p.commit_held();
    p.hold_commits = false;
    assert!(matches!(p.error(second), Reject::Internal(_)));
    p.publish(publisher, "t", b"for nobody");
    assert_eq!(p.puback(publisher), PubAckStatus::NoSubscribers);
    assert!(p.delivers(second).is_empty());
}

/// A client that disconnects before its durable `Subscribe` fails keeps nothing of
/// it: not the filter, nor a connection-bound one it had before, nor (with no other
/// filter) its place among the session's subscribers. Watchers hear it leave once.
#[test]
fn a_durable_subscribe_failing_after_its_connection_left_leaves_nothing() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let watcher = p.connect(&s, "watcher");
    p.send_subscribe(watcher, "t", false, true);
    p.take(watcher);
    for had_filter in [false, true] {
        let sub = p.connect(&s, "sub");
        if had_filter {
            p.subscribe(sub, "t", false);
        }
        p.hold_commits = true;
        p.send_subscribe(sub, "t", true, false);
        assert_eq!(
            p.presence(watcher),
            vec![("sub".to_owned(), PresenceEvent::Joined)]
        );
        p.cmd(Command::Disconnected { conn: sub });
        p.fail_oldest_held();
        p.commit_held();
        p.hold_commits = false;
        assert_eq!(
            p.presence(watcher),
            vec![("sub".to_owned(), PresenceEvent::Left)]
        );
        assert_eq!(p.core.stats().subscribers, 1, "only the watcher");
        p.publish(publisher, "t", b"watcher only");
        assert_eq!(p.puback(publisher), PubAckStatus::Accepted);
        p.take(watcher);

        // Back again, it has no subscription it did not make.
        let sub = p.connect(&s, "sub");
        p.publish(publisher, "t", b"not for sub");
        p.take(publisher);
        assert!(p.delivers(sub).is_empty());
        p.take(watcher);
        p.cmd(Command::Disconnected { conn: sub });
        p.take(watcher);
    }
}

/// A connection-bound subscription made durable in a batch that failed stays as it
/// was, and a retry makes it durable.
#[test]
fn a_failed_upgrade_to_durable_leaves_the_subscription_connection_bound() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", false);
    p.subscribe_failing(sub, "t", true);
    p.publish(publisher, "t", b"live");
    assert_eq!(p.puback(publisher), PubAckStatus::Accepted);
    assert_eq!(p.delivers(sub), vec![(b"live".to_vec(), 1)]);

    p.subscribe(sub, "t", true);
    assert_eq!(p.store.subscription_count(), 1);
    p.publish(publisher, "t", b"kept");
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);
}

#[test]
fn durable_subscriptions_and_backlog_survive_a_restart() {
    let mut p = Pair::new();
    let s = settings("s");
    let publisher = p.connect(&s, "pub");
    let sub = p.connect(&s, "sub");
    p.subscribe(sub, "t", true);
    p.cmd(Command::Disconnected { conn: sub });
    p.publish(publisher, "t", b"one");
    p.publish(publisher, "t", b"two");

    p.restart();
    let sub = p.connect(&s, "sub");
    assert_eq!(
        payloads(&p.delivers(sub)),
        vec![b"one".to_vec(), b"two".to_vec()]
    );
    let publisher = p.connect(&s, "pub");
    p.publish(publisher, "t", b"three");
    assert_eq!(p.puback(publisher), PubAckStatus::Stored);
    assert_eq!(payloads(&p.delivers(sub)), vec![b"three".to_vec()]);
}

#[test]
fn presence_is_announced_to_watchers_only() {
    let mut p = Pair::new();
    let s = settings("s");
    let watcher = p.connect(&s, "watcher");
    p.cmd(Command::Subscribe {
        conn: watcher,
        request_id: 1,
        filter: filter("room"),
        durable: false,
        presence: true,
        history: 0,
    });
    p.take(watcher);
    let other = p.connect(&s, "other");
    p.subscribe(other, "room", false);
    let joined = p.take(watcher);
    assert!(matches!(
        joined.as_slice(),
        [Event::Presence(p)] if p.event == PresenceEvent::Joined && p.client_id.as_str() == "other"
    ));
    p.cmd(Command::Disconnected { conn: other });
    assert!(matches!(
        p.take(watcher).as_slice(),
        [Event::Presence(p)] if p.event == PresenceEvent::Left
    ));
}

#[test]
fn frames_before_hello_are_refused() {
    let mut p = Pair::new();
    let stranger = ConnId(99);
    p.cmd(Command::Subscribe {
        conn: stranger,
        request_id: 3,
        filter: filter("t"),
        durable: false,
        presence: false,
        history: 0,
    });
    assert_eq!(p.error(stranger), Reject::NotAuthenticated);
}

#[test]
fn key_directory_round_trip() {
    let mut p = Pair::new();
    let s = settings("s");
    let alice = p.connect(&s, "alice");
    p.cmd(Command::PublishKey {
        conn: alice,
        request_id: 4,
        public_key: Bytes::from_static(&[1; 32]),
    });
    assert!(
        matches!(p.take(alice).as_slice(), [Event::Keys { request_id: 4, keys }] if keys.len() == 1)
    );
    p.cmd(Command::PublishKey {
        conn: alice,
        request_id: 5,
        public_key: Bytes::from_static(&[1; 31]),
    });
    assert!(matches!(p.error(alice), Reject::InvalidFrame(_)));
}

#[test]
fn files_go_to_online_subscribers_once_and_legacy_only_to_legacy() {
    let mut p = Pair::new();
    let s = settings("s");
    let sender = p.connect(&s, "sender");
    let native = p.connect(&s, "native");
    let dart = p.connect_with(&s, "dart", false, true);
    let offline = p.connect(&s, "offline");
    p.subscribe(native, "files/#", false);
    p.subscribe(native, "files/+", false);
    p.subscribe(dart, "files/#", false);
    p.subscribe(offline, "files/#", true);
    p.cmd(Command::Disconnected { conn: offline });

    let offer = |id: u8, format| FileOffer {
        file_id: MessageId([id; 16]),
        topic: TopicName::parse("files/a").expect("valid"),
        timestamp_ms: T0,
        format,
        size: 10,
    };
    let receivers = p
        .core
        .open_file(p.now, sender, &offer(1, PayloadFormat::NativeV1))
        .expect("admitted");
    assert_eq!(
        receivers.live,
        vec![native],
        "once per connection, online only, no legacy"
    );
    assert!(
        receivers.spool && receivers.durable,
        "spooled, and synced for the offline durable subscriber"
    );
    let receivers = p
        .core
        .open_file(p.now, sender, &offer(2, PayloadFormat::LegacyJson))
        .expect("admitted");
    assert_eq!(receivers.live, vec![native, dart]);

    assert!(
        matches!(
            p.core
                .open_file(p.now, sender, &offer(1, PayloadFormat::NativeV1)),
            Err(Reject::RateLimited(_))
        ),
        "its upload is under way"
    );
    let mut big = offer(3, PayloadFormat::NativeV1);
    big.size = p.core.config().max_file_bytes + 1;
    assert!(matches!(
        p.core.open_file(p.now, sender, &big),
        Err(Reject::PayloadTooLarge { .. })
    ));
    assert_eq!(
        p.core
            .open_file(p.now, ConnId(999), &offer(4, PayloadFormat::NativeV1)),
        Err(Reject::NotAuthenticated)
    );
}

/// A file's id is committed with the file, not with its offer (design §4): while an
/// upload runs its id is taken, an upload that ends short gives it back, and only an
/// accepted file's id is refused as a replay, after a restart too.
#[test]
fn a_file_id_is_recorded_when_the_file_is_accepted() {
    let mut p = Pair::new();
    let s = settings("s");
    let sender = p.connect(&s, "sender");
    let offer = |id: u8| FileOffer {
        file_id: MessageId([id; 16]),
        topic: TopicName::parse("files/a").expect("valid"),
        timestamp_ms: T0,
        format: PayloadFormat::NativeV1,
        size: 10,
    };
    let recorded = |p: &mut Pair, id: u8| {
        let restore = p.store.restore(p.now);
        restore
            .replay_ids
            .iter()
            .any(|(_, i, _)| *i == MessageId([id; 16]))
    };
    let done = |id: u8| FileDone {
        file_id: MessageId([id; 16]),
        topic: TopicName::parse("files/a").expect("valid"),
        timestamp_ms: T0,
        format: PayloadFormat::NativeV1,
        header: Bytes::from_static(b"header"),
        live: Vec::new(),
        spooled: false, // nobody subscribes
    };

    p.core
        .open_file(p.now, sender, &offer(1))
        .expect("admitted");
    p.drive();
    assert!(!recorded(&mut p, 1), "not committed while it streams");
    assert!(
        matches!(
            p.core.open_file(p.now, sender, &offer(1)),
            Err(Reject::RateLimited(_))
        ),
        "one upload of a file id at a time, and not yet a replay"
    );
    p.core.abandon_file(&s.name, &MessageId([1; 16]), T0);
    p.core
        .open_file(p.now, sender, &offer(1))
        .expect("free again once the first upload ended short");
    assert!(
        !p.core
            .complete_file(p.now, sender, done(1))
            .expect("accepted")
    );
    p.drive();
    assert!(recorded(&mut p, 1), "committed with the file");
    assert!(p.take(sender).is_empty(), "nothing was delivered");
    p.core.abandon_file(&s.name, &MessageId([1; 16]), T0);
    assert_eq!(
        p.core.open_file(p.now, sender, &offer(1)),
        Err(Reject::Replayed),
        "a late notice of the accepted upload's end frees nothing"
    );

    let mut q = Pair::new();
    q.now = p.now;
    q.core.restore(p.store.restore(p.now));
    let sender = q.connect(&s, "sender");
    assert_eq!(
        q.core.open_file(q.now, sender, &offer(1)),
        Err(Reject::Replayed),
        "after a restart"
    );
}

/// Completes a file `id` on "files/a" sent by `sender`, streamed live to `live`.
fn complete(p: &mut Pair, sender: ConnId, id: u8, live: Vec<ConnId>) -> bool {
    let offer = FileOffer {
        file_id: MessageId([id; 16]),
        topic: TopicName::parse("files/a").expect("valid"),
        timestamp_ms: p.now,
        format: PayloadFormat::NativeV1,
        size: 10,
    };
    p.core.open_file(p.now, sender, &offer).expect("admitted");
    let done = FileDone {
        file_id: offer.file_id,
        topic: offer.topic,
        timestamp_ms: offer.timestamp_ms,
        format: offer.format,
        header: Bytes::from_static(b"header"),
        live,
        spooled: true,
    };
    let durable = p
        .core
        .complete_file(p.now, sender, done)
        .expect("completed");
    p.drive();
    durable
}

/// Files' copies (design §10): a receiver that streamed the file counts as sent and is
/// retried only if it does not acknowledge; one that did not is sent the file at once
/// (a `Deliver` of a file message, which the driver streams from the spool); an
/// offline durable subscriber gets it when it comes back; the spool goes once every
/// copy is acknowledged.
#[test]
fn a_completed_file_is_queued_like_a_message() {
    let mut p = Pair::new();
    let s = settings("s");
    let sender = p.connect(&s, "sender");
    let live = p.connect(&s, "live");
    let behind = p.connect(&s, "behind");
    let away = p.connect(&s, "away");
    for conn in [live, behind, away] {
        p.subscribe(conn, "files/#", conn == away);
    }
    p.cmd(Command::Disconnected { conn: away });

    assert!(complete(&mut p, sender, 1, vec![live]), "a durable copy");
    assert!(p.take(live).is_empty(), "the live receiver has it already");
    let sent = p.take(behind);
    let [
        Event::Deliver {
            message,
            attempt: 1,
        },
    ] = sent.as_slice()
    else {
        panic!("expected the file to be sent from the spool, got {sent:?}");
    };
    assert_eq!(message.kind, MessageKind::File);
    assert_eq!(&message.payload[..], b"header", "the header is the body");
    p.ack(behind, MessageId([1; 16]));

    // No ack from the live receiver: the spool sends it again.
    p.advance(s.retry_interval_ms);
    assert!(matches!(
        p.take(live).as_slice(),
        [Event::Deliver { attempt: 2, .. }]
    ));
    p.ack(live, MessageId([1; 16]));
    assert!(
        p.dropped_spools.is_empty(),
        "the durable copy is still queued"
    );

    let away = p.connect(&s, "away");
    let backlog = p.take(away);
    assert!(
        matches!(backlog.as_slice(), [Event::Deliver { message, .. }] if message.kind == MessageKind::File),
        "the offline durable subscriber gets it on its return, got {backlog:?}"
    );
    p.ack(away, MessageId([1; 16]));
    assert_eq!(p.dropped_spools, vec![MessageId([1; 16])]);
}

/// A file copy the store drops by itself (an unsubscribe's discard, a clean start)
/// is counted off once: the spool goes with the last copy, not before.
#[test]
fn a_file_s_spool_goes_when_the_store_drops_its_last_copy() {
    let mut p = Pair::new();
    let s = settings("s");
    let sender = p.connect(&s, "sender");
    for client in ["a", "b"] {
        let conn = p.connect(&s, client);
        p.subscribe(conn, "files/#", true);
        p.cmd(Command::Disconnected { conn });
    }
    assert!(
        complete(&mut p, sender, 1, Vec::new()),
        "two durable copies"
    );

    // "a" comes back and unsubscribes before its backlog is read.
    p.hold_loads = true;
    let a = p.connect(&s, "a");
    p.unsubscribe(a, "files/#");
    p.deliver_loads();
    assert!(files_sent(&mut p, a).is_empty());
    assert!(p.dropped_spools.is_empty(), "b's copy still needs it");

    // "b" starts clean: its copy goes in the store, and with it the spool.
    p.connect_with(&s, "b", true, false);
    assert_eq!(p.dropped_spools, vec![MessageId([1; 16])]);
}

/// An unsubscribe counts off a file copy it finds in memory once, although the copy
/// was also a row in the store.
#[test]
fn an_unsubscribe_counts_off_a_file_copy_read_back_once() {
    let mut p = Pair::with_limits(1, 1);
    let s = settings("s");
    let sender = p.connect(&s, "sender");
    for client in ["a", "b"] {
        let conn = p.connect(&s, client);
        p.subscribe(conn, "files/#", true);
        p.cmd(Command::Disconnected { conn });
    }
    complete(&mut p, sender, 1, Vec::new());
    // More backlog behind the file, so that "a" is still reading it from the store.
    for i in 0..3u8 {
        p.publish(sender, "files/notes", &[i]);
    }
    let a = p.connect(&s, "a");
    assert_eq!(files_sent(&mut p, a).len(), 1, "read back and sent");
    p.unsubscribe(a, "files/#");
    assert!(p.dropped_spools.is_empty(), "b's copy still needs it");
    let b = p.connect(&s, "b");
    assert_eq!(files_sent(&mut p, b).len(), 1);
    p.ack(b, MessageId([1; 16]));
    assert_eq!(p.dropped_spools, vec![MessageId([1; 16])]);
}

/// A connection-bound receiver's file copies that spilled to the store and were read
/// back are counted off once when it leaves, by the store's `DeleteEphemeral`.
#[test]
fn spilled_file_copies_are_counted_off_once_when_their_connection_ends() {
    let mut p = Pair::with_limits(1, 1);
    let s = settings("s");
    let sender = p.connect(&s, "sender");
    let keeper = p.connect(&s, "keeper");
    p.subscribe(keeper, "files/#", true);
    p.cmd(Command::Disconnected { conn: keeper });
    let reader = p.connect(&s, "reader");
    p.subscribe(reader, "files/#", false);
    for id in 1..=4 {
        complete(&mut p, sender, id, Vec::new());
    }
    assert!(
        p.store.copy_count() > 4,
        "some of the reader's copies spilled"
    );
    // The reader takes two files, so that spilled copies are read back into memory.
    for _ in 0..2 {
        let sent = files_sent(&mut p, reader);
        let [(id, 1)] = sent.as_slice() else {
            panic!("one file at a time, got {sent:?}");
        };
        let id = *id;
        p.cmd(Command::FileStreamed {
            conn: reader,
            file_id: id,
        });
        p.ack(reader, id);
    }
    p.cmd(Command::Disconnected { conn: reader });
    assert_eq!(
        p.dropped_spools,
        vec![],
        "the durable copies still need every file"
    );

    let keeper = p.connect_with(&s, "keeper", true, false);
    let _ = keeper;
    let mut dropped = p.dropped_spools.clone();
    dropped.sort();
    assert_eq!(
        dropped,
        (1..=4).map(|i| MessageId([i; 16])).collect::<Vec<_>>()
    );
}

/// The ids of the files sent to `conn` (as `Deliver`s of file messages), with their
/// attempts; other events are dropped.
fn files_sent(p: &mut Pair, conn: ConnId) -> Vec<(MessageId, u32)> {
    p.take(conn)
        .into_iter()
        .filter_map(|e| match e {
            Event::Deliver { message, attempt } if message.kind == MessageKind::File => {
                Some((message.id, attempt))
            }
            _ => None,
        })
        .collect()
}

/// A connection is sent one file at a time (each streams on its own, and clients read
/// them in turn), and a file's retry interval runs from the end of its stream, not
/// from its start: a large file is not sent again while it is still streaming.
#[test]
fn files_are_sent_one_at_a_time_and_retried_after_their_stream() {
    let mut p = Pair::new();
    let s = settings("s");
    let sender = p.connect(&s, "sender");
    let reader = p.connect(&s, "reader");
    p.subscribe(reader, "files/#", false);
    complete(&mut p, sender, 1, vec![]);
    complete(&mut p, sender, 2, vec![]);
    let (one, two) = (MessageId([1; 16]), MessageId([2; 16]));
    assert_eq!(
        files_sent(&mut p, reader),
        vec![(one, 1)],
        "the second waits"
    );

    p.advance(10 * s.retry_interval_ms);
    assert!(
        files_sent(&mut p, reader).is_empty(),
        "no retry while it streams"
    );
    p.cmd(Command::FileStreamed {
        conn: reader,
        file_id: one,
    });
    p.advance(s.retry_interval_ms);
    assert_eq!(files_sent(&mut p, reader), vec![(one, 2)], "retried after");

    p.cmd(Command::FileStreamed {
        conn: reader,
        file_id: one,
    });
    p.ack(reader, one);
    assert_eq!(files_sent(&mut p, reader), vec![(two, 1)]);
}

/// A file nobody wants any more when it completes lets its spool go at once, and a
/// connection-bound receiver that leaves releases its copy.
#[test]
fn a_file_without_copies_lets_its_spool_go() {
    let mut p = Pair::new();
    let s = settings("s");
    let sender = p.connect(&s, "sender");
    assert!(!complete(&mut p, sender, 1, vec![]));
    assert_eq!(p.dropped_spools, vec![MessageId([1; 16])]);

    let reader = p.connect(&s, "reader");
    p.subscribe(reader, "files/a", false);
    complete(&mut p, sender, 2, vec![reader]);
    assert_eq!(p.dropped_spools.len(), 1, "held by the reader's copy");
    p.cmd(Command::Disconnected { conn: reader });
    assert_eq!(
        p.dropped_spools,
        vec![MessageId([1; 16]), MessageId([2; 16])]
    );
}

#[test]
fn subscribe_with_history_replays_retained_messages_first() {
    let mut p = Pair::new();
    let mut s = settings("s");
    s.history_size = 3;
    let publisher = p.connect(&s, "pub");
    for (topic, body) in [
        ("a/1", b"one"),
        ("a/2", b"two"),
        ("a/1", b"thr"),
        ("b/1", b"xxx"),
        ("a/1", b"fou"),
        ("a/1", b"fiv"),
    ] {
        p.publish(publisher, topic, body);
    }
    // Exact topic: the last 3 of a/1 (its history size), oldest first.
    let one = p.connect(&s, "one");
    p.subscribe_with_history(one, "a/1", 10);
    assert_eq!(
        payloads(&p.delivers(one)),
        vec![b"thr".to_vec(), b"fou".to_vec(), b"fiv".to_vec()]
    );
    // Wildcard: the newest 2 across matching topics.
    let two = p.connect(&s, "two");
    p.subscribe_with_history(two, "a/+", 2);
    assert_eq!(
        payloads(&p.delivers(two)),
        vec![b"fou".to_vec(), b"fiv".to_vec()]
    );
    // Then live traffic follows.
    p.publish(publisher, "a/2", b"new");
    assert_eq!(payloads(&p.delivers(two)), vec![b"new".to_vec()]);
    // No history asked, none given; expired messages are not replayed.
    let three = p.connect(&s, "three");
    p.subscribe_with_history(three, "a/#", 0);
    assert!(p.delivers(three).is_empty());
    p.advance(s.message_expiry_ms + 1);
    let four = p.connect(&s, "four");
    p.subscribe_with_history(four, "a/#", 10);
    assert!(p.delivers(four).is_empty());
}

#[test]
fn sessions_without_history_retain_nothing() {
    let mut p = Pair::new();
    let s = settings("s"); // history_size 0
    let publisher = p.connect(&s, "pub");
    p.publish(publisher, "t", b"m");
    let sub = p.connect(&s, "sub");
    p.subscribe_with_history(sub, "t", 100);
    assert!(p.delivers(sub).is_empty());
}

/// A session holds at most `max_session_clients` connected clients, and as many with
/// subscriptions: offline ones kept by durable subscriptions count too. A client it
/// already holds comes back (a takeover, a durable client reconnecting) whatever the
/// count.
#[test]
fn a_session_holds_only_so_many_clients() {
    let mut p = Pair::with_config(CoreConfig {
        max_session_clients: 2,
        ..CoreConfig::default()
    });
    let s = settings("crowded");
    let a = p.connect(&s, "a");
    let b = p.connect(&s, "b");
    let c = p.hello(&s, "c", false, false);
    assert!(
        matches!(p.closed.get(&c), Some(Reject::LimitExceeded(_))),
        "{:?}",
        p.closed.get(&c)
    );
    assert!(p.take(c).is_empty(), "no Welcome for a refused client");
    assert_eq!(p.core.stats().connections, 2);

    // A takeover is no new client.
    let a = {
        let again = p.connect(&s, "a");
        assert_eq!(p.closed.get(&a), Some(&Reject::TakenOver));
        again
    };
    p.subscribe(a, "t/#", true);
    p.subscribe(b, "t/#", true);
    p.cmd(Command::Disconnected { conn: a });
    p.cmd(Command::Disconnected { conn: b });
    assert_eq!(
        p.core.stats().subscribers,
        2,
        "kept by durable subscriptions"
    );

    // Connecting is allowed again, but not one more subscribed client.
    let c = p.connect(&s, "c");
    p.cmd(Command::Subscribe {
        conn: c,
        request_id: 9,
        filter: filter("t/#"),
        durable: false,
        presence: false,
        history: 0,
    });
    assert!(matches!(p.error(c), Reject::LimitExceeded(_)));
    // A durable client comes back to its subscription, and hears what is published.
    let a = p.connect(&s, "a");
    p.publish(c, "t/x", b"hi");
    assert_eq!(payloads(&p.delivers(a)), vec![b"hi".to_vec()]);
    // Two connected again: a third is refused.
    let d = p.hello(&s, "d", false, false);
    assert!(matches!(p.closed.get(&d), Some(Reject::LimitExceeded(_))));
}
