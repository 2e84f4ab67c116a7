//! One suite for every [`Store`]: each implementation must give the same answers.

use std::sync::Arc;

use bytes::Bytes;

use crate::core::{
    BacklogRequest, ClientId, Message, MessageId, MessageKind, RestoredSubscription, SessionName,
    SessionSettings, StoreBatch, StoreOp, TopicFilter, TopicName,
};
use crate::proto::PayloadFormat;

use super::memory::MemoryStore;
use super::sqlite::SqliteStore;
use super::{Committed, PushToken, SessionRecord, Store, StoreError};

const NOW: u64 = 1_700_000_000_000;

fn session() -> SessionName {
    SessionName::parse("s1").expect("valid")
}
fn client(c: &str) -> ClientId {
    ClientId::parse(c).expect("valid")
}

fn message(seq: u64, expires_at: u64) -> Arc<Message> {
    Arc::new(Message {
        session: session(),
        id: MessageId([seq as u8; 16]),
        seq,
        topic: TopicName::parse("a/b").expect("valid"),
        payload: Bytes::from(vec![seq as u8; 3]),
        timestamp_ms: NOW,
        format: PayloadFormat::NativeV1,
        kind: MessageKind::Message,
        accepted_at: NOW,
        expires_at,
    })
}

fn put(seq: u64, client_id: &str, ephemeral: bool) -> Vec<StoreOp> {
    vec![
        StoreOp::PutMessage(message(seq, NOW + 60_000)),
        StoreOp::PutCopy {
            session: session(),
            client_id: client(client_id),
            seq,
            ephemeral,
            replayed: false,
        },
    ]
}

/// Remember id `[byte; 16]` of the test session until `expires_at`.
fn replay_id(byte: u8, expires_at: u64) -> StoreOp {
    StoreOp::PutReplayId {
        session: session(),
        id: MessageId([byte; 16]),
        expires_at,
    }
}

/// A second connection to the SQLite file at `path`, to look under the store.
async fn raw_pool(path: &std::path::Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect")
}

fn request(client_id: &str, after_seq: u64, limit: usize) -> BacklogRequest {
    BacklogRequest {
        session: session(),
        client_id: client(client_id),
        after_seq,
        limit,
        token: 1,
    }
}

/// Commits `ops` as one batch (stores do not look at batch ids).
async fn commit(store: &dyn Store, ops: Vec<StoreOp>) -> Committed {
    store
        .commit(&[StoreBatch { id: 1, ops }])
        .await
        .expect("commit")
}

async fn seqs(store: &dyn Store, client_id: &str, after: u64, limit: usize) -> (Vec<u64>, bool) {
    let (rows, exhausted) = store
        .backlog(&request(client_id, after, limit), NOW)
        .await
        .expect("backlog");
    (rows.iter().map(|r| r.message.seq).collect(), exhausted)
}

async fn suite(store: &dyn Store) {
    // Sessions: created once, never overwritten.
    let record = SessionRecord {
        settings: SessionSettings::new(session()),
        password_hash: "$argon2id$fake".into(),
        created_at: NOW,
    };
    store.create_session(&record).await.expect("create");
    let mut other = record.clone();
    other.password_hash = "$argon2id$other".into();
    assert!(matches!(
        store.create_session(&other).await,
        Err(StoreError::SessionExists(_))
    ));
    assert_eq!(
        store.session(&session()).await.expect("get"),
        Some(record.clone())
    );
    assert_eq!(store.count_sessions().await.expect("count"), 1);
    assert_eq!(store.sessions().await.expect("list"), vec![record]);

    // Copies come back in seq order, paged, for their own client only.
    let mut ops = Vec::new();
    for seq in 1..=5 {
        ops.extend(put(seq, "alice", false));
    }
    ops.extend(put(6, "bob", false));
    ops.push(replay_id(9, NOW + 30_000));
    ops.push(StoreOp::PutSubscription {
        session: session(),
        client_id: client("alice"),
        filter: TopicFilter::parse("a/#").expect("valid"),
        legacy_only: true,
    });
    commit(store, ops).await;
    assert_eq!(seqs(store, "alice", 0, 3).await, (vec![1, 2, 3], false));
    assert_eq!(seqs(store, "alice", 3, 3).await, (vec![4, 5], true));
    assert_eq!(seqs(store, "bob", 0, 10).await, (vec![6], true));
    assert_eq!(seqs(store, "carol", 0, 10).await, (vec![], true));

    // Acks delete; attempts are kept; ops apply in order within and across batches.
    let b2 = StoreBatch {
        id: 2,
        ops: vec![
            StoreOp::DeleteCopy {
                session: session(),
                client_id: client("alice"),
                seq: 1,
            },
            StoreOp::SetAttempts {
                session: session(),
                client_id: client("alice"),
                seq: 2,
                attempts: 3,
            },
        ],
    };
    let mut ops3 = put(7, "alice", true);
    ops3.push(StoreOp::DeleteCopy {
        session: session(),
        client_id: client("alice"),
        seq: 7,
    });
    ops3.extend(put(8, "alice", true));
    store
        .commit(&[b2, StoreBatch { id: 3, ops: ops3 }])
        .await
        .expect("commit");
    let (rows, _) = store
        .backlog(&request("alice", 0, 10), NOW)
        .await
        .expect("backlog");
    let got: Vec<(u64, u32, bool)> = rows
        .iter()
        .map(|r| (r.message.seq, r.attempts, r.ephemeral))
        .collect();
    assert_eq!(
        got,
        vec![
            (2, 3, false),
            (3, 0, false),
            (4, 0, false),
            (5, 0, false),
            (8, 0, true)
        ]
    );
    assert_eq!(rows[0].message.payload, Bytes::from(vec![2u8; 3]));
    assert_eq!(rows[0].message.topic.as_str(), "a/b");

    // Restore: ephemeral copies are gone, subscriptions and replay ids come back.
    let restore = store.restore(NOW).await.expect("restore");
    assert_eq!(restore.sessions.len(), 1);
    assert_eq!(
        restore.subscriptions,
        vec![RestoredSubscription {
            session: session(),
            client_id: client("alice"),
            filter: TopicFilter::parse("a/#").expect("valid"),
            legacy_only: true,
        }],
        "a legacy connection's subscription comes back as one"
    );
    // The client logged in natively since: the mark follows it, on every one of its
    // subscriptions and no one else's.
    let legacy = |c: &str, f: &str| StoreOp::PutSubscription {
        session: session(),
        client_id: client(c),
        filter: TopicFilter::parse(f).expect("valid"),
        legacy_only: true,
    };
    let native = StoreOp::SetLegacyOnly {
        session: session(),
        client_id: client("alice"),
        legacy_only: false,
    };
    commit(
        store,
        vec![legacy("alice", "b"), legacy("bob", "a/#"), native],
    )
    .await;
    let mut restored: Vec<(String, bool)> = store
        .restore(NOW)
        .await
        .expect("restore")
        .subscriptions
        .into_iter()
        .map(|r| {
            (
                format!("{} {}", r.client_id.as_str(), r.filter.as_str()),
                r.legacy_only,
            )
        })
        .collect();
    restored.sort();
    assert_eq!(
        restored,
        vec![
            ("alice a/#".to_owned(), false),
            ("alice b".to_owned(), false),
            ("bob a/#".to_owned(), true),
        ]
    );
    let forget_bob = StoreOp::DeleteSubscription {
        session: session(),
        client_id: client("bob"),
        filter: TopicFilter::parse("a/#").expect("valid"),
    };
    commit(store, vec![forget_bob]).await;
    assert_eq!(
        restore.replay_ids,
        vec![(session(), MessageId([9; 16]), NOW + 30_000)]
    );
    assert_eq!(
        restore.next_seq, 7,
        "seq 8 was ephemeral and dropped; 7 was acked"
    );
    assert_eq!(seqs(store, "alice", 0, 10).await, (vec![2, 3, 4, 5], true));

    // Clean start drops a client's subscriptions and copies.
    store
        .commit(&[StoreBatch {
            id: 4,
            ops: vec![StoreOp::DeleteClient {
                session: session(),
                client_id: client("alice"),
            }],
        }])
        .await
        .expect("commit");
    assert_eq!(seqs(store, "alice", 0, 10).await, (vec![], true));
    assert!(
        store
            .restore(NOW)
            .await
            .expect("restore")
            .subscriptions
            .is_empty()
    );

    // Expiry: backlog skips expired copies, purge deletes them and old replay ids.
    let mut ops = vec![StoreOp::PutMessage(message(20, NOW + 10))];
    ops.push(StoreOp::PutCopy {
        session: session(),
        client_id: client("bob"),
        seq: 20,
        ephemeral: false,
        replayed: false,
    });
    commit(store, ops).await;
    let later = NOW + 40_000;
    let (rows, _) = store
        .backlog(&request("bob", 0, 10), later)
        .await
        .expect("backlog");
    assert_eq!(rows.len(), 1, "seq 6 expires later, seq 20 already did");
    assert!(store.purge(later, 100).await.expect("purge").rows >= 2);
    assert!(
        store
            .restore(later)
            .await
            .expect("restore")
            .replay_ids
            .is_empty()
    );

    let token = |user: &str, device: &str| PushToken {
        session: session(),
        user_id: user.into(),
        device_id: device.into(),
        token: "secret".into(),
        platform: "android".into(),
    };
    // At most two devices per session: past it the one registered longest ago goes.
    let elsewhere = PushToken {
        session: SessionName::parse("elsewhere").expect("valid"),
        ..token("zed", "z1")
    };
    for (user, device) in [
        ("alice", "d1"),
        ("alice", "d2"),
        ("alice", "d1"),
        ("bob", "d1"),
    ] {
        store
            .put_push_token(&token(user, device), 2)
            .await
            .expect("push token");
        if device == "d2" {
            store
                .put_push_token(&elsewhere, 2)
                .await
                .expect("push token");
        }
    }
    let devices = |tokens: Vec<PushToken>| {
        tokens
            .into_iter()
            .map(|t| (t.user_id, t.device_id))
            .collect::<Vec<(String, String)>>()
    };
    let held = devices(store.push_tokens(&session()).await.expect("devices"));
    assert_eq!(
        held,
        vec![("alice".into(), "d1".into()), ("bob".into(), "d1".into())],
        "alice/d2 went: alice/d1 registered again since"
    );
    let held = devices(
        store
            .push_tokens(&elsewhere.session)
            .await
            .expect("devices"),
    );
    assert_eq!(
        held,
        vec![("zed".into(), "z1".into())],
        "sessions count apart"
    );
    store.ping().await.expect("ping");
}

/// Backlog pages are right whatever was written when: copies already in the tables,
/// and copies, acks and attempts committed since (the SQLite store's journal).
async fn backlog_across_commits(store: &dyn Store) {
    let mut ops = Vec::new();
    for seq in 101..=103 {
        ops.extend(put(seq, "frank", false));
    }
    commit(store, ops).await;
    store.purge(NOW, 100).await.expect("purge"); // the SQLite store folds here
    let mut ops = vec![
        StoreOp::DeleteCopy {
            session: session(),
            client_id: client("frank"),
            seq: 102,
        },
        StoreOp::SetAttempts {
            session: session(),
            client_id: client("frank"),
            seq: 103,
            attempts: 5,
        },
    ];
    ops.extend(put(104, "frank", true));
    ops.extend(put(105, "frank", false));
    ops.extend(put(106, "grace", false));
    commit(store, ops).await;
    let page = |after, limit| async move {
        let (rows, exhausted) = store
            .backlog(&request("frank", after, limit), NOW)
            .await
            .expect("backlog");
        let rows: Vec<(u64, u32, bool)> = rows
            .iter()
            .map(|r| (r.message.seq, r.attempts, r.ephemeral))
            .collect();
        (rows, exhausted)
    };
    assert_eq!(
        page(0, 2).await,
        (vec![(101, 0, false), (103, 5, false)], false)
    );
    assert_eq!(
        page(103, 2).await,
        (vec![(104, 0, true), (105, 0, false)], true)
    );
    assert_eq!(page(0, 4).await.0.len(), 4);
    assert!(page(0, 4).await.1, "four copies in all");
    assert_eq!(page(105, 4).await, (vec![], true));
    assert_eq!(seqs(store, "grace", 0, 10).await, (vec![106], true));
}

/// Copies on `topic` of message `seq` for each of `clients`, with the message.
fn put_on(seq: u64, topic: &str, clients: &[&str]) -> Vec<StoreOp> {
    let mut message = (*message(seq, NOW + 60_000)).clone();
    message.topic = TopicName::parse(topic).expect("valid");
    let mut ops = vec![StoreOp::PutMessage(Arc::new(message))];
    for c in clients {
        ops.push(StoreOp::PutCopy {
            session: session(),
            client_id: client(c),
            seq,
            ephemeral: false,
            replayed: false,
        });
    }
    ops
}

/// An unsubscribe's discard drops the client's copies no remaining filter matches,
/// wherever they were written (the tables, or the SQLite store's journal), and
/// nobody else's.
async fn discard_keeps_what_is_still_wanted(store: &dyn Store) {
    let mut ops = put_on(301, "a/b", &["kate"]);
    ops.extend(put_on(302, "c", &["kate", "leo"]));
    commit(store, ops).await;
    store.purge(NOW, 100).await.expect("purge"); // the SQLite store folds here
    let mut ops = put_on(303, "c", &["kate"]);
    ops.extend(put_on(304, "a/c", &["kate"]));
    commit(store, ops).await;
    let discard = StoreOp::DiscardCopies {
        session: session(),
        client_id: client("kate"),
        keep: vec![TopicFilter::parse("a/#").expect("valid")],
    };
    commit(store, vec![discard]).await;
    assert_eq!(seqs(store, "kate", 0, 10).await, (vec![301, 304], true));
    let (rows, _) = store
        .backlog(&request("leo", 0, 10), NOW)
        .await
        .expect("backlog");
    assert_eq!(rows.len(), 1, "another client's copy of 302 stays");
    assert_eq!(rows[0].message.payload, Bytes::from(vec![46u8; 3]));

    let discard_all = StoreOp::DiscardCopies {
        session: session(),
        client_id: client("kate"),
        keep: Vec::new(),
    };
    commit(store, vec![discard_all]).await;
    assert_eq!(seqs(store, "kate", 0, 10).await, (vec![], true));
}

/// A discard reports the file copies it drops, and keeps the rest, however the
/// client's topics fall: some unwanted, all, none, or more than a few.
async fn discard_by_topic_or_by_row(store: &dyn Store) {
    let file_on = |seq, topic: &str| {
        let mut ops = put_on(seq, topic, &["max"]);
        if let StoreOp::PutMessage(m) = &mut ops[0] {
            Arc::make_mut(m).kind = MessageKind::File;
        }
        ops
    };
    let discard = |keep: &str| StoreOp::DiscardCopies {
        session: session(),
        client_id: client("max"),
        keep: vec![TopicFilter::parse(keep).expect("valid")],
    };
    let mut ops = file_on(501, "f/x");
    ops.extend(put_on(502, "k/1", &["max"]));
    commit(store, ops).await;
    assert_eq!(
        commit(store, vec![discard("k/#")]).await.dropped_files,
        [501]
    );
    assert_eq!(
        seqs(store, "max", 0, 10).await.0,
        [502],
        "some topics unwanted"
    );
    assert!(
        commit(store, vec![discard("z/#")])
            .await
            .dropped_files
            .is_empty()
    );
    assert!(seqs(store, "max", 0, 10).await.0.is_empty(), "all unwanted");
    commit(store, put_on(503, "k/2", &["max"])).await;
    commit(store, vec![discard("#")]).await;
    assert_eq!(seqs(store, "max", 0, 10).await.0, [503], "none unwanted");
    let mut ops = Vec::new();
    for i in 0..70 {
        ops.extend(put_on(600 + i, &format!("m/{i}"), &["max"]));
    }
    ops.extend(put_on(700, "k/3", &["max"]));
    ops.extend(file_on(701, "m/file"));
    commit(store, ops).await;
    store.purge(NOW, 1000).await.expect("purge"); // the SQLite store folds here
    assert_eq!(
        commit(store, vec![discard("k/#")]).await.dropped_files,
        [701]
    );
    assert_eq!(
        seqs(store, "max", 0, 100).await.0,
        [503, 700],
        "many topics unwanted"
    );
}

fn ack(client_id: &str, seq: u64) -> StoreOp {
    StoreOp::DeleteCopy {
        session: session(),
        client_id: client(client_id),
        seq,
    }
}

/// Message `seq` on topic `h` with a copy spilled for `client_id`'s connection by a
/// history replay.
fn spill(client_id: &str, seq: u64) -> Vec<StoreOp> {
    let mut ops = put_on(seq, "h", &[]);
    ops.push(StoreOp::PutCopy {
        session: session(),
        client_id: client(client_id),
        seq,
        ephemeral: true,
        replayed: true,
    });
    ops
}

/// A stored copy acknowledged and then queued again as a spilled one (a history
/// replay) is a new, ephemeral copy: it is read back, and goes with the connection;
/// acknowledged once more in between, nothing stays. Before and after a fold.
async fn a_copy_queued_again_after_its_ack_is_a_new_one(store: &dyn Store) {
    let mut ops = put_on(801, "h", &["ivy"]);
    ops.extend(put_on(802, "h", &["ivy"]));
    commit(store, ops).await;
    store.purge(NOW, 100).await.expect("purge"); // the SQLite store folds here
    let mut ops = vec![ack("ivy", 801)];
    ops.extend(spill("ivy", 801));
    ops.push(ack("ivy", 802));
    ops.extend(spill("ivy", 802));
    ops.push(ack("ivy", 802));
    commit(store, ops).await;
    assert_eq!(seqs(store, "ivy", 0, 10).await.0, [801]);
    store.purge(NOW, 100).await.expect("purge");
    let (rows, _) = store
        .backlog(&request("ivy", 0, 10), NOW)
        .await
        .expect("backlog");
    assert_eq!(rows.len(), 1);
    assert!(rows[0].ephemeral && rows[0].attempts == 0, "a new copy");
    let gone = StoreOp::DeleteEphemeral {
        session: session(),
        client_id: client("ivy"),
    };
    commit(store, vec![gone]).await;
    assert!(seqs(store, "ivy", 0, 10).await.0.is_empty());
}

/// A copy spilled while the client's stored copy of the same message is still queued
/// (a history replay) stands for that copy: acknowledged in the same commit, the
/// stored copy goes, and an attempt count set meanwhile is kept on it, which stays
/// durable. Before and after a fold.
async fn a_spill_over_a_stored_copy_reaches_it(store: &dyn Store) {
    let mut ops = put_on(901, "h", &["jay"]);
    ops.extend(put_on(902, "h", &["jay"]));
    commit(store, ops).await;
    store.purge(NOW, 100).await.expect("purge"); // the SQLite store folds here
    let mut ops = spill("jay", 901);
    ops.push(ack("jay", 901));
    ops.extend(spill("jay", 902));
    ops.push(StoreOp::SetAttempts {
        session: session(),
        client_id: client("jay"),
        seq: 902,
        attempts: 4,
    });
    commit(store, ops).await;
    for when in ["before the fold", "after it"] {
        let (rows, _) = store
            .backlog(&request("jay", 0, 10), NOW)
            .await
            .expect("backlog");
        let rows: Vec<_> = rows
            .iter()
            .map(|r| (r.message.seq, r.attempts, r.ephemeral))
            .collect();
        assert_eq!(rows, [(902, 4, false)], "{when}");
        store.purge(NOW, 100).await.expect("purge");
    }
}

/// Ops that drop a client's copies wholesale report the file copies among them, one
/// entry per copy, so the core can let spool files go.
async fn wholesale_drops_report_file_copies(store: &dyn Store) {
    let mut file = (*message(401, NOW + 60_000)).clone();
    file.kind = MessageKind::File;
    let copy = |c: &str, seq, ephemeral| StoreOp::PutCopy {
        session: session(),
        client_id: client(c),
        seq,
        ephemeral,
        replayed: false,
    };
    let mut ops = vec![StoreOp::PutMessage(Arc::new(file))];
    ops.extend([copy("mia", 401, false), copy("ned", 401, true)]);
    ops.extend(put_on(402, "f/y", &["mia"]));
    commit(store, ops).await;
    let discard = StoreOp::DiscardCopies {
        session: session(),
        client_id: client("mia"),
        keep: Vec::new(),
    };
    assert_eq!(commit(store, vec![discard]).await.dropped_files, vec![401]);
    let ephemeral = StoreOp::DeleteEphemeral {
        session: session(),
        client_id: client("ned"),
    };
    assert_eq!(
        commit(store, vec![ephemeral]).await.dropped_files,
        vec![401]
    );
    let clean = StoreOp::DeleteClient {
        session: session(),
        client_id: client("ned"),
    };
    assert_eq!(
        commit(store, vec![clean]).await.dropped_files,
        Vec::<u64>::new(),
        "nothing left"
    );
}

/// Expired messages, their copies and expired replay ids go, in steps of `limit` where
/// the store takes steps (SQLite) and at once otherwise (memory); in the end exactly
/// the expired ones are gone. Returns the number of steps.
async fn purge_in_steps(store: &dyn Store) -> usize {
    for seq in 201..=205 {
        let mut ops = vec![StoreOp::PutMessage(message(seq, NOW + 10))];
        for c in ["ivy", "jack"] {
            ops.push(StoreOp::PutCopy {
                session: session(),
                client_id: client(c),
                seq,
                ephemeral: false,
                replayed: false,
            });
        }
        ops.push(replay_id(seq as u8, NOW + 10));
        store
            .commit(&[StoreBatch { id: seq, ops }])
            .await
            .expect("commit");
    }
    let mut ops = put(210, "ivy", false);
    ops.push(replay_id(210, NOW + 60_000));
    commit(store, ops).await;
    let later = NOW + 20_000;
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps <= 10, "a purge in steps must end");
        if !store.purge(later, 2).await.expect("purge").more {
            break;
        }
    }
    // Read as of NOW, when 201..=205 had not expired: they are gone, not skipped.
    assert_eq!(seqs(store, "ivy", 0, 10).await, (vec![210], true));
    assert_eq!(seqs(store, "jack", 0, 10).await, (vec![], true));
    assert_eq!(
        store.restore(later).await.expect("restore").replay_ids,
        vec![(session(), MessageId([210; 16]), NOW + 60_000)]
    );
    steps
}

#[tokio::test]
async fn memory_store() {
    suite(&MemoryStore::default()).await;
    backlog_across_commits(&MemoryStore::default()).await;
    discard_keeps_what_is_still_wanted(&MemoryStore::default()).await;
    wholesale_drops_report_file_copies(&MemoryStore::default()).await;
    discard_by_topic_or_by_row(&MemoryStore::default()).await;
    a_copy_queued_again_after_its_ack_is_a_new_one(&MemoryStore::default()).await;
    a_spill_over_a_stored_copy_reaches_it(&MemoryStore::default()).await;
    assert_eq!(purge_in_steps(&MemoryStore::default()).await, 1);
}

#[tokio::test]
async fn sqlite_store_in_memory() {
    suite(&SqliteStore::open_in_memory().await.expect("open")).await;
    backlog_across_commits(&SqliteStore::open_in_memory().await.expect("open")).await;
    discard_keeps_what_is_still_wanted(&SqliteStore::open_in_memory().await.expect("open")).await;
    wholesale_drops_report_file_copies(&SqliteStore::open_in_memory().await.expect("open")).await;
    discard_by_topic_or_by_row(&SqliteStore::open_in_memory().await.expect("open")).await;
    a_copy_queued_again_after_its_ack_is_a_new_one(
        &SqliteStore::open_in_memory().await.expect("open"),
    )
    .await;
    a_spill_over_a_stored_copy_reaches_it(&SqliteStore::open_in_memory().await.expect("open"))
        .await;
    // Five expired messages and five expired replay-log rows, two of each per step.
    let store = SqliteStore::open_in_memory().await.expect("open");
    assert_eq!(purge_in_steps(&store).await, 3);
}

/// A purge in steps leaves no copy without its message, and no expired replay row.
#[tokio::test]
async fn sqlite_purge_in_steps_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fastport.db");
    let store = SqliteStore::open(&path).await.expect("open");
    purge_in_steps(&store).await;
    store.close().await;
    let pool = raw_pool(&path).await;
    for (sql, expected) in [
        ("SELECT count(*) FROM copies", 1),
        (
            "SELECT count(*) FROM copies WHERE seq NOT IN (SELECT seq FROM messages)",
            0,
        ),
        ("SELECT count(*) FROM messages", 1),
        ("SELECT count(*) FROM replay_log", 1),
    ] {
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(n, expected, "{sql}");
    }
}

/// An unsubscribe's discards, by topic, by row or wholesale, and an ack that reaches
/// a stored copy through a spill, take the message bodies only the dropped copies
/// held, and leave no copy without its body.
#[tokio::test]
async fn sqlite_discards_leave_no_orphan_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fastport.db");
    let store = SqliteStore::open(&path).await.expect("open");
    discard_keeps_what_is_still_wanted(&store).await;
    discard_by_topic_or_by_row(&store).await;
    a_spill_over_a_stored_copy_reaches_it(&store).await;
    store.close().await;
    let pool = raw_pool(&path).await;
    for (sql, expected) in [
        // leo's copy of 302, max's of 503 and 700, jay's of 902.
        ("SELECT count(*) FROM copies", 4),
        ("SELECT count(*) FROM messages", 4),
        (
            "SELECT count(*) FROM copies WHERE seq NOT IN (SELECT seq FROM messages)",
            0,
        ),
    ] {
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(n, expected, "{sql}");
    }
}

#[tokio::test]
async fn sqlite_store_on_disk_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nested/fastport.db");
    {
        let store = SqliteStore::open(&path).await.expect("open");
        suite(&store).await;
        store
            .commit(&[StoreBatch {
                id: 9,
                ops: put(30, "dave", false),
            }])
            .await
            .expect("commit");
        store.close().await;
    }
    let store = SqliteStore::open(&path).await.expect("reopen");
    assert_eq!(seqs(&store, "dave", 0, 10).await, (vec![30], true));
    assert_eq!(store.count_sessions().await.expect("count"), 1);
}

#[tokio::test]
async fn sqlite_op_log_survives_a_crash_between_folds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fastport.db");
    {
        let store = SqliteStore::open(&path).await.expect("open");
        let mut ops = put(1, "erin", false);
        ops.extend(put(2, "erin", false));
        ops.extend(put(3, "erin", false));
        ops.push(replay_id(7, NOW + 30_000));
        commit(&store, ops).await;
        let acked = StoreOp::DeleteCopy {
            session: session(),
            client_id: client("erin"),
            seq: 2,
        };
        let attempts = StoreOp::SetAttempts {
            session: session(),
            client_id: client("erin"),
            seq: 3,
            attempts: 2,
        };
        commit(&store, vec![acked, attempts]).await;
        // No close(): the ops are only in the op log, as after a kill -9.
        drop(store);
    }
    let store = SqliteStore::open(&path).await.expect("reopen");
    let (rows, _) = store
        .backlog(&request("erin", 0, 10), NOW)
        .await
        .expect("backlog");
    let got: Vec<(u64, u32)> = rows.iter().map(|r| (r.message.seq, r.attempts)).collect();
    assert_eq!(got, vec![(1, 0), (3, 2)]);
    let restore = store.restore(NOW).await.expect("restore");
    assert_eq!(
        restore.replay_ids,
        vec![(session(), MessageId([7; 16]), NOW + 30_000)]
    );
}

/// A crash after a fold committed but before it emptied the op log leaves records the
/// database already holds: the next open must not apply them again.
#[tokio::test]
async fn sqlite_records_folded_before_a_crash_are_not_applied_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fastport.db");
    let oplog = dir.path().join("fastport.db.oplog");
    let stale = {
        let store = SqliteStore::open(&path).await.expect("open");
        store
            .commit(&[StoreBatch {
                id: 1,
                ops: put(1, "fay", false),
            }])
            .await
            .expect("commit");
        let stale = std::fs::read(&oplog).expect("read op log");
        // Fold (purge folds first): the copy becomes a row.
        store.purge(NOW, 100).await.expect("purge");
        let acked = StoreOp::DeleteCopy {
            session: session(),
            client_id: client("fay"),
            seq: 1,
        };
        commit(&store, vec![acked]).await;
        store.purge(NOW, 100).await.expect("purge");
        drop(store);
        stale
    };
    // The file as if neither fold had got to truncate it.
    std::fs::write(&oplog, stale).expect("write op log");
    let store = SqliteStore::open(&path).await.expect("reopen");
    assert_eq!(
        seqs(&store, "fay", 0, 10).await,
        (vec![], true),
        "an acknowledged copy came back"
    );
    // And the sequence goes on past what was folded: a new record is applied.
    store
        .commit(&[StoreBatch {
            id: 3,
            ops: put(2, "fay", false),
        }])
        .await
        .expect("commit");
    drop(store);
    let store = SqliteStore::open(&path).await.expect("reopen");
    assert_eq!(seqs(&store, "fay", 0, 10).await, (vec![2], true));
}

/// Rows a version before the op log left in the `journal` table are folded at the
/// next open, and deleted.
#[tokio::test]
async fn sqlite_rows_of_the_old_journal_table_are_folded_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fastport.db");
    SqliteStore::open(&path).await.expect("open").close().await;
    {
        let pool = raw_pool(&path).await;
        let ops = put(5, "gus", false);
        let (replay, expires_at) =
            super::journal::pack_replay_ids(&[(&session(), &MessageId([9; 16]), NOW + 30_000)]);
        sqlx::query("INSERT INTO journal (expires_at, replay, ops) VALUES (?, ?, ?)")
            .bind(expires_at as i64)
            .bind(replay)
            .bind(super::journal::encode_ops(ops.iter()))
            .execute(&pool)
            .await
            .expect("insert");
        pool.close().await;
    }
    let store = SqliteStore::open(&path).await.expect("reopen");
    assert_eq!(seqs(&store, "gus", 0, 10).await, (vec![5], true));
    let restore = store.restore(NOW).await.expect("restore");
    assert_eq!(
        restore.replay_ids,
        vec![(session(), MessageId([9; 16]), NOW + 30_000)]
    );
    store.close().await;
    let pool = raw_pool(&path).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM journal")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(left, 0);
}

/// A database made before the legacy mark (migration 0005) opens, its durable
/// subscriptions come back as native ones, and take the mark when their client
/// logs in over the legacy bridge.
#[tokio::test]
async fn sqlite_subscriptions_from_before_the_legacy_mark_take_it_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fastport.db");
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options)
            .await
            .expect("create");
        let before = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Borrowed(&super::sqlite::MIGRATOR.migrations[..4]),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        before.run(&pool).await.expect("migrations 0001-0004");
        sqlx::query("INSERT INTO subscriptions (session, client_id, filter) VALUES (?, ?, ?)")
            .bind(session().as_str())
            .bind("dart")
            .bind("inbox/#")
            .execute(&pool)
            .await
            .expect("insert");
        pool.close().await;
    }
    let store = SqliteStore::open(&path).await.expect("open and migrate");
    let restored = store.restore(NOW).await.expect("restore").subscriptions;
    assert_eq!(restored.len(), 1);
    assert!(!restored[0].legacy_only);
    let mark = StoreOp::SetLegacyOnly {
        session: session(),
        client_id: client("dart"),
        legacy_only: true,
    };
    commit(&store, vec![mark]).await;
    let restored = store.restore(NOW).await.expect("restore").subscriptions;
    assert!(restored[0].legacy_only, "{restored:?}");
    store.close().await;
}
