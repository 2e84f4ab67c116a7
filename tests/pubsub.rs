//! Publish/subscribe through the real broker binary with the real SDK over QUIC.

mod common;

use std::time::Duration;

use common::{Broker, contains, db_bytes, durable, within};
use fastport::client::{
    Client, ClientError, PresenceChange, PublishStatus, PublishedKey, SessionKey, SubscribeOptions,
    SubscriptionEvent,
};
use fastport::proto::ErrorCode;
use serde_json::json;

#[tokio::test]
async fn encrypted_round_trip_never_shows_plaintext_to_the_broker() {
    let broker = Broker::start();
    broker
        .create_session("chat", "correct horse", json!({}))
        .await;
    let key = SessionKey::generate();
    let marker = format!("PLAINTEXT-{}", hex::encode(rand::random::<[u8; 8]>()));

    // A durable subscriber that is offline, so the message has to be written to SQLite.
    let durable = broker
        .client_config("chat", "correct horse", &key)
        .client_id("offline-reader");
    let reader = within("connect", Client::connect(durable.clone()))
        .await
        .expect("connect");
    let options = common::durable();
    drop(
        reader
            .subscribe_with("room/#", options)
            .await
            .expect("subscribe"),
    );
    reader.close().await;

    let live = broker.client("chat", "correct horse", &key).await;
    let mut sub = live.subscribe("room/+").await.expect("subscribe");
    let publisher = broker.client("chat", "correct horse", &key).await;
    let ack = publisher
        .publish("room/lobby", marker.clone().into_bytes())
        .await
        .expect("publish");
    assert_eq!(ack.status, PublishStatus::Stored);

    let got = within("delivery", sub.next()).await.expect("a message");
    assert_eq!(got.topic, "room/lobby");
    assert_eq!(got.payload, marker.as_bytes());
    assert_eq!(got.attempt, 1);

    // The SQLite file holds the message (its topic is there) but not its plaintext.
    let db = db_bytes(&broker.db_path());
    assert!(
        contains(&db, b"room/lobby"),
        "the stored copy is in the database"
    );
    assert!(
        !contains(&db, marker.as_bytes()),
        "plaintext found in the database"
    );
    assert!(
        !broker.logs().contains(&marker),
        "plaintext found in the broker's logs"
    );
    assert!(
        !broker.logs().contains("correct horse"),
        "password found in the logs"
    );

    // The offline reader gets it, decrypted, when it comes back.
    let reader = within("reconnect", Client::connect(durable))
        .await
        .expect("connect");
    let mut sub = reader
        .subscribe_with("room/#", options)
        .await
        .expect("subscribe");
    let got = within("backlog", sub.next())
        .await
        .expect("backlog message");
    assert_eq!(got.payload, marker.as_bytes());
}

#[tokio::test]
async fn sessions_are_isolated_and_passwords_checked() {
    let broker = Broker::start();
    broker
        .create_session("tenant-a", "password-a", json!({}))
        .await;
    broker
        .create_session("tenant-b", "password-b", json!({}))
        .await;
    let key = SessionKey::generate();

    let wrong = Client::connect(broker.client_config("tenant-a", "password-b", &key)).await;
    assert!(
        matches!(
            wrong,
            Err(ClientError::Refused {
                code: ErrorCode::Unauthenticated,
                ..
            })
        ),
        "wrong password must be refused, got {:?}",
        wrong.err()
    );
    let unknown = Client::connect(broker.client_config("nobody", "password-a", &key)).await;
    assert!(matches!(
        unknown,
        Err(ClientError::Refused {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));

    let a = broker.client("tenant-a", "password-a", &key).await;
    let b = broker.client("tenant-b", "password-b", &key).await;
    let mut a_room = a.subscribe("room").await.expect("subscribe");
    let mut b_room = b.subscribe("room").await.expect("subscribe");
    let mut b_all = b.subscribe("#").await.expect("subscribe");

    let ack = a
        .publish("room", b"only for a".to_vec())
        .await
        .expect("publish");
    assert_eq!(ack.status, PublishStatus::Accepted);
    assert_eq!(
        within("a", a_room.next()).await.expect("msg").payload,
        &b"only for a"[..]
    );

    b.publish("room", b"only for b".to_vec())
        .await
        .expect("publish");
    // b's own subscriptions get b's message first and only it: nothing from a arrived.
    assert_eq!(
        within("b", b_room.next()).await.expect("msg").payload,
        &b"only for b"[..]
    );
    assert_eq!(
        within("b#", b_all.next()).await.expect("msg").payload,
        &b"only for b"[..]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a_room.next())
            .await
            .is_err(),
        "a must not see b's message"
    );
}

#[tokio::test]
async fn durable_backlog_arrives_in_order_after_reconnect() {
    let broker = Broker::start();
    broker
        .create_session("orders", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let config = broker
        .client_config("orders", "secret-pass", &key)
        .client_id("warehouse");
    let options = durable();
    let sub = within("connect", Client::connect(config.clone()))
        .await
        .expect("connect");
    sub.subscribe_with("orders/#", options)
        .await
        .expect("subscribe");
    sub.close().await;

    let publisher = broker.client("orders", "secret-pass", &key).await;
    for i in 0..50 {
        let ack = publisher
            .publish(
                &format!("orders/{}", i % 3),
                format!("order {i}").into_bytes(),
            )
            .await
            .expect("publish");
        assert_eq!(ack.status, PublishStatus::Stored);
    }

    let sub = within("connect", Client::connect(config))
        .await
        .expect("connect");
    let mut stream = sub
        .subscribe_with("orders/#", options)
        .await
        .expect("subscribe");
    for i in 0..50 {
        let m = within("backlog", stream.next()).await.expect("message");
        assert_eq!(
            m.payload,
            format!("order {i}").as_bytes(),
            "backlog out of order"
        );
    }
}

#[tokio::test]
async fn legacy_json_payloads_cross_between_sdk_clients() {
    let broker = Broker::start();
    broker
        .create_session("mixed", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let a = broker.client("mixed", "secret-pass", &key).await;
    let mut sub = a.subscribe("t").await.expect("subscribe");
    a.publish_legacy("t", "héllo dart").await.expect("publish");
    let m = within("legacy", sub.next()).await.expect("message");
    assert_eq!(m.payload, "héllo dart".as_bytes());
    assert_eq!(m.format, fastport::proto::PayloadFormat::LegacyJson);
}

/// A client that turns legacy payloads off (they carry no MAC over topic, id and
/// time) gets only `NATIVE_V1` messages, however often the legacy one is sent.
#[tokio::test]
async fn a_client_may_refuse_unauthenticated_legacy_payloads() {
    let broker = Broker::start();
    broker
        .create_session("mixed", "secret-pass", json!({"retryInterval": 200}))
        .await;
    let key = SessionKey::generate();
    let config = broker
        .client_config("mixed", "secret-pass", &key)
        .accept_legacy(false);
    let strict = within("connect", Client::connect(config))
        .await
        .expect("connect");
    let mut sub = strict.subscribe("t").await.expect("subscribe");
    let sender = broker.client("mixed", "secret-pass", &key).await;
    sender
        .publish_legacy("t", "from dart")
        .await
        .expect("publish");
    sender
        .publish("t", b"native".to_vec())
        .await
        .expect("publish");
    let m = within("the native message", sub.next())
        .await
        .expect("message");
    assert_eq!(m.payload, &b"native"[..]);
    assert!(
        tokio::time::timeout(Duration::from_millis(600), sub.next())
            .await
            .is_err(),
        "nothing else, retries included"
    );
}

#[tokio::test]
async fn wrong_key_messages_are_dropped_not_delivered() {
    let broker = Broker::start();
    broker
        .create_session("keys", "secret-pass", json!({}))
        .await;
    let good = SessionKey::generate();
    let other = SessionKey::generate();
    let reader = broker.client("keys", "secret-pass", &good).await;
    let mut sub = reader.subscribe("t").await.expect("subscribe");
    let stranger = broker.client("keys", "secret-pass", &other).await;
    stranger
        .publish("t", b"forged".to_vec())
        .await
        .expect("publish");
    let friend = broker.client("keys", "secret-pass", &good).await;
    friend
        .publish("t", b"genuine".to_vec())
        .await
        .expect("publish");
    let m = within("genuine", sub.next()).await.expect("message");
    assert_eq!(
        m.payload,
        &b"genuine"[..],
        "the forged message must fail its MAC"
    );
}

#[tokio::test]
async fn late_subscribers_get_the_retained_history_first() {
    let broker = Broker::start();
    broker
        .create_session("news", "secret-pass", json!({"historySize": 5}))
        .await;
    let key = SessionKey::generate();
    let publisher = broker.client("news", "secret-pass", &key).await;
    for i in 0..8 {
        publisher
            .publish("news/today", format!("story {i}").into_bytes())
            .await
            .expect("publish");
    }
    let reader = broker.client("news", "secret-pass", &key).await;
    let options = SubscribeOptions {
        history: 10,
        ..SubscribeOptions::default()
    };
    let mut sub = reader
        .subscribe_with("news/#", options)
        .await
        .expect("subscribe");
    for i in 3..8 {
        let m = within("history", sub.next())
            .await
            .expect("retained message");
        assert_eq!(
            m.payload,
            format!("story {i}").as_bytes(),
            "the last 5, oldest first"
        );
    }
    publisher
        .publish("news/today", b"live".to_vec())
        .await
        .expect("publish");
    assert_eq!(
        within("live", sub.next()).await.expect("live").payload,
        &b"live"[..]
    );
}

/// Clones of one client share its connection and seal on their own tasks: publishes
/// from many tasks at once all arrive intact, and a bad topic is refused to its caller
/// without reaching the broker or upsetting the others.
#[tokio::test]
async fn clones_of_one_client_publish_from_many_tasks_at_once() {
    let broker = Broker::start();
    broker
        .create_session("busy", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let reader = broker.client("busy", "secret-pass", &key).await;
    let mut sub = reader.subscribe("work/#").await.expect("subscribe");
    let client = broker.client("busy", "secret-pass", &key).await;

    const TASKS: usize = 8;
    const EACH: usize = 50;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                // Large enough that sealing takes a while, so the tasks overlap.
                let payload = vec![(t * EACH + i) as u8; 16 * 1024 + i];
                client
                    .publish(&format!("work/{t}"), payload)
                    .await
                    .expect("publish");
            }
        }));
    }
    let refused = client.publish("work/+/wildcard", b"no".to_vec()).await;
    assert!(
        matches!(refused, Err(ClientError::Invalid(_))),
        "a wildcard topic is refused to its caller: {refused:?}"
    );
    for task in tasks {
        task.await.expect("publisher task");
    }

    let mut seen = std::collections::HashSet::new();
    for _ in 0..TASKS * EACH {
        let m = within("delivery", sub.next()).await.expect("a message");
        let t: usize = m.topic["work/".len()..].parse().expect("topic work/N");
        let i = m.payload.len() - 16 * 1024;
        assert!(
            t < TASKS && i < EACH,
            "unexpected {} ({} B)",
            m.topic,
            m.payload.len()
        );
        assert!(
            m.payload.iter().all(|b| *b == (t * EACH + i) as u8),
            "payload {t}/{i} arrived intact"
        );
        assert!(seen.insert((t, i)), "{t}/{i} delivered once");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "nothing more arrives"
    );
}

/// Large payloads are sealed off the caller's task (`SEAL_OFF_TASK`); a run of them
/// mixed with small ones, published back to back without waiting for `PubAck`s,
/// still arrives whole and in the order it was published.
#[tokio::test]
async fn large_and_small_pipelined_publishes_keep_their_order() {
    let broker = Broker::start();
    broker
        .create_session("bulk", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let reader = broker.client("bulk", "secret-pass", &key).await;
    let mut sub = reader.subscribe("bulk/in").await.expect("subscribe");
    let client = broker.client("bulk", "secret-pass", &key).await;

    let sizes: Vec<usize> = (0..12)
        .map(|i| if i % 3 == 2 { 100 + i } else { 300 * 1024 + i })
        .collect();
    let mut pending = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let payload = vec![i as u8; *size];
        pending.push(
            client
                .publish_pipelined("bulk/in", payload)
                .await
                .expect("queued"),
        );
    }
    let refused = client
        .publish_pipelined("bulk/+", vec![0u8; 300 * 1024])
        .await;
    assert!(
        matches!(refused, Err(ClientError::Invalid(_))),
        "a large publish to a wildcard topic is refused to its caller"
    );
    for ack in pending {
        within("PubAck", ack).await.expect("acknowledged");
    }
    for (i, size) in sizes.iter().enumerate() {
        let m = within("delivery", sub.next()).await.expect("a message");
        assert_eq!(m.payload.len(), *size, "message {i} in order");
        assert!(
            m.payload.iter().all(|b| *b == i as u8),
            "message {i} intact"
        );
    }
}

#[tokio::test]
async fn publishes_over_the_payload_limit_are_refused_before_sealing() {
    // The broker's own cap (64 KiB) is also its largest frame but for 64 KiB of
    // headroom: a publish past that used to get the connection dropped, and the
    // client resent it after every reconnect, for ever.
    let broker = Broker::start_with(&["--max-payload", "65536"]);
    broker
        .create_session("small", "secret-pass", json!({"maxPayloadBytes": 4081}))
        .await;
    broker
        .create_session("capped", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();

    let client = broker.client("small", "secret-pass", &key).await;
    assert_eq!(client.session_info().max_payload_bytes, 4081);
    // NATIVE_V1 adds a version byte, an IV, a MAC and 1-16 bytes of padding: 4,031
    // bytes seal to 4,081 (the limit, exactly), 4,032 to 4,097.
    let fits = within("publish at the limit", client.publish("t", vec![1u8; 4031])).await;
    assert!(
        fits.is_ok(),
        "a payload sealing to the limit is accepted: {fits:?}"
    );
    let over = within(
        "publish over the limit",
        client.publish("t", vec![1u8; 4032]),
    )
    .await;
    match over {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::PayloadTooLarge);
            assert!(message.contains("4032 bytes is 4097 bytes"), "{message}");
            assert!(message.contains("limit of 4081 bytes"), "{message}");
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // Legacy JSON is larger (base64 and a hash). The message is the SDK's own: the
    // broker would refuse it too, but without the plaintext's size.
    let legacy = within("legacy over", client.publish_legacy("t", &"x".repeat(3000))).await;
    match legacy {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::PayloadTooLarge);
            assert!(message.contains("3000 bytes is 4117 bytes"), "{message}");
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }

    // Past the broker's largest frame: refused at once, and the client carries on.
    let client = broker.client("capped", "secret-pass", &key).await;
    assert_eq!(client.session_info().max_payload_bytes, 65536);
    let huge = within(
        "publish past the frame limit",
        client.publish("t", vec![1u8; 200_000]),
    )
    .await;
    assert!(
        matches!(
            &huge,
            Err(ClientError::Refused {
                code: ErrorCode::PayloadTooLarge,
                ..
            })
        ),
        "{huge:?}"
    );
    let after = within("publish after", client.publish("t", vec![1u8; 100])).await;
    assert!(after.is_ok(), "the connection is still usable: {after:?}");
    assert_eq!(
        client.session_info().connections,
        1,
        "no reconnect was needed"
    );
}

#[tokio::test]
async fn a_pending_publish_over_a_lowered_limit_is_refused_after_the_reconnect() {
    let mut broker = Broker::start_with(&["--max-payload", "1048576"]);
    broker
        .create_session("shrink", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let client = broker.client("shrink", "secret-pass", &key).await;
    assert_eq!(client.session_info().max_payload_bytes, 1_048_576);

    // Queued while the broker is down, within the limit the client last heard of.
    broker.kill9();
    let pending = client
        .publish_pipelined("t", vec![1u8; 200_000])
        .await
        .expect("queued while disconnected");
    // Back with a cap below the stored session's limit and below the publish.
    broker.restart_with(&["--max-payload", "65536"]);
    let answer = within("the pending publish's answer", pending).await;
    match answer {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::PayloadTooLarge);
            // Usually with "it may have reached the broker …": the client wrote it to
            // the connection it had not yet noticed was dead.
            assert!(message.contains("limit of 65536 bytes"), "{message}");
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert_eq!(
        client.session_info().max_payload_bytes,
        65_536,
        "the broker caps the stored session's limit"
    );
    let after = within("publish after", client.publish("t", vec![1u8; 100])).await;
    assert!(after.is_ok(), "{after:?}");
}

/// Dropping a subscription's handle ends it on the broker, for messages and files
/// alike: the broker stops sending what nobody here reads (and would only retry). A
/// durable one is kept for the client id's next connection, also when a non-durable
/// subscription on the same filter is dropped after or before it.
#[tokio::test]
async fn a_dropped_subscription_ends_on_the_broker_unless_durable() {
    let broker = Broker::start();
    broker
        .create_session("drop", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let config = broker
        .client_config("drop", "secret-pass", &key)
        .client_id("dropper");
    let client = within("connect", Client::connect(config))
        .await
        .expect("connect");
    let publisher = broker.client("drop", "secret-pass", &key).await;
    let status = |topic: &'static str| {
        let publisher = &publisher;
        async move {
            publisher
                .publish(topic, b"x".to_vec())
                .await
                .expect("publish")
                .status
        }
    };
    let durable = common::durable();

    let messages = client.subscribe("m/#").await.expect("subscribe");
    let files = client.subscribe_files("f/#").await.expect("subscribe");
    // A durable and a plain subscription on one filter, dropped in either order.
    let kept = client
        .subscribe_with("d/#", durable)
        .await
        .expect("subscribe");
    let beside = client.subscribe("d/#").await.expect("subscribe");
    let beside_first = client.subscribe("e/#").await.expect("subscribe");
    let kept_after = client
        .subscribe_with("e/#", durable)
        .await
        .expect("subscribe");
    for topic in ["m/x", "f/x", "d/x", "e/x"] {
        assert_ne!(status(topic).await, PublishStatus::NoSubscribers, "{topic}");
    }

    drop((messages, files, kept, beside));
    drop(beside_first);
    drop(kept_after);
    // Nothing is published in between: the drop itself ends them (a delivery to a
    // dropped subscription would end it too, and hide a drop that did nothing).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for topic in ["m/x", "f/x"] {
        assert_eq!(status(topic).await, PublishStatus::NoSubscribers, "{topic}");
    }
    for topic in ["d/x", "e/x"] {
        assert_eq!(status(topic).await, PublishStatus::Stored, "{topic}");
    }
}

/// Dropping more subscriptions at once than the client's request queue holds ends
/// every one of them on the broker: `Drop` cannot wait for room in the queue, and the
/// notices that did not fit used to be lost (a file subscription then lived on the
/// broker until the connection ended). The test's runtime has one thread, so the
/// client's task cannot take anything from its queue while the handles are dropped.
#[tokio::test]
async fn dropping_many_subscriptions_at_once_ends_them_all() {
    const COUNT: usize = 300;
    let broker = Broker::start();
    broker
        .create_session("drops", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let client = broker.client("drops", "secret-pass", &key).await;
    let publisher = broker.client("drops", "secret-pass", &key).await;
    let mut subscriptions = Vec::with_capacity(COUNT);
    for i in 0..COUNT {
        let filter = format!("f/{i}");
        subscriptions.push(client.subscribe_files(&filter).await.expect("subscribe"));
    }
    let status = |topic: String| {
        let publisher = &publisher;
        async move {
            publisher
                .publish(&topic, b"x".to_vec())
                .await
                .expect("publish")
                .status
        }
    };
    assert_ne!(status("f/0".into()).await, PublishStatus::NoSubscribers);

    drop(subscriptions);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for i in 0..COUNT {
        let topic = format!("f/{i}");
        assert_eq!(
            status(topic.clone()).await,
            PublishStatus::NoSubscribers,
            "{topic}"
        );
    }
}

/// The session's public-key directory (design §5) through the SDK: each client's
/// X25519 key under its client id, for the others to read. The broker keeps it in
/// memory, so after a restart the SDK publishes its key again when it reconnects.
#[tokio::test]
async fn clients_find_each_other_s_public_keys_in_the_directory() {
    let mut broker = Broker::start();
    broker.create_session("keys", "pw", json!({})).await;
    let key = SessionKey::generate();
    let alice = broker.client_as("alice", "keys", "pw", &key).await;
    let bob = broker.client_as("bob", "keys", "pw", &key).await;
    let entry = |id: &str, byte: u8| PublishedKey {
        client_id: id.into(),
        public_key: [byte; 32],
    };

    assert_eq!(bob.keys().await.expect("keys"), []);
    let listed = alice.publish_key([1; 32]).await.expect("published");
    assert_eq!(listed, [entry("alice", 1)]);
    assert_eq!(bob.keys().await.expect("keys"), [entry("alice", 1)]);
    let listed = bob.publish_key([2; 32]).await.expect("published");
    assert_eq!(listed, [entry("alice", 1), entry("bob", 2)]);
    // A new key replaces the client's old one.
    alice.publish_key([3; 32]).await.expect("published");
    assert_eq!(
        bob.keys().await.expect("keys"),
        [entry("alice", 3), entry("bob", 2)]
    );

    broker.restart();
    let both = [entry("alice", 3), entry("bob", 2)];
    let mut seen = Vec::new();
    for _ in 0..100 {
        // Fails while the client reconnects; then lists what was published again.
        seen = bob.keys().await.unwrap_or_default();
        if seen == both {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, both, "published again after the restart");
}

/// A subscription that asks for presence (design §10) hears who subscribes to its
/// filter and who leaves, beside its messages.
#[tokio::test]
async fn a_subscription_with_presence_hears_who_joins_and_leaves() {
    let broker = Broker::start();
    broker.create_session("room", "pw", json!({})).await;
    let key = SessionKey::generate();
    let alice = broker.client_as("alice", "room", "pw", &key).await;
    let options = SubscribeOptions {
        presence: true,
        ..Default::default()
    };
    let mut watching = alice
        .subscribe_with("room/1", options)
        .await
        .expect("subscribe");

    let bob = broker.client_as("bob", "room", "pw", &key).await;
    let _bob_in = bob.subscribe("room/1").await.expect("subscribe");
    let joined = PresenceChange::Joined {
        client_id: "bob".into(),
    };
    let event = within("presence", watching.next_event()).await;
    assert!(
        matches!(&event, Some(SubscriptionEvent::Presence(change)) if *change == joined),
        "{event:?}"
    );
    bob.publish("room/1", b"hi".to_vec())
        .await
        .expect("publish");
    let event = within("message", watching.next_event()).await;
    assert!(
        matches!(&event, Some(SubscriptionEvent::Message(m)) if m.payload == b"hi"[..]),
        "{event:?}"
    );
    bob.close().await;
    let left = PresenceChange::Left {
        client_id: "bob".into(),
    };
    let event = within("presence", watching.next_event()).await;
    assert!(
        matches!(&event, Some(SubscriptionEvent::Presence(change)) if *change == left),
        "{event:?}"
    );
}

/// `--max-session-clients` caps one session's connected clients: the next is refused
/// with LIMIT_EXCEEDED, other sessions are not touched, and a slot freed is taken.
#[tokio::test]
async fn a_session_takes_only_so_many_clients() {
    let broker = Broker::start_with(&["--max-session-clients", "2"]);
    broker
        .create_session("small", "secret-pass", json!({}))
        .await;
    broker
        .create_session("other", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let first = broker.client("small", "secret-pass", &key).await;
    let _second = broker.client("small", "secret-pass", &key).await;
    let third = Client::connect(broker.client_config("small", "secret-pass", &key)).await;
    match third {
        Err(ClientError::Refused {
            code: ErrorCode::LimitExceeded,
            message,
        }) => assert!(message.contains("as many clients"), "{message}"),
        other => panic!("a third client must be refused, got {:?}", other.err()),
    }
    let _elsewhere = broker.client("other", "secret-pass", &key).await;
    first.close().await;
    broker.client_when_room("small", "secret-pass", &key).await;
}

/// `--max-subscriptions` caps one client's subscriptions: a filter past it is refused
/// with LIMIT_EXCEEDED, one subscribed again is not another, and another client has
/// its own.
#[tokio::test]
async fn a_client_holds_only_so_many_subscriptions() {
    let broker = Broker::start_with(&["--max-subscriptions", "2"]);
    broker
        .create_session("subs", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let client = broker.client("subs", "secret-pass", &key).await;
    let _a = client.subscribe("a").await.expect("first");
    let _b = client.subscribe("b").await.expect("second");
    let _b_again = client.subscribe("b").await.expect("the same filter again");
    match client.subscribe("c").await {
        Err(ClientError::Refused {
            code: ErrorCode::LimitExceeded,
            message,
        }) => assert!(message.contains("as many subscriptions"), "{message}"),
        other => panic!("a third filter must be refused, got {:?}", other.err()),
    }
    let other = broker.client("subs", "secret-pass", &key).await;
    let _c = other.subscribe("c").await.expect("another client's own");
}

/// With `--quic-retry-above 0` every QUIC client proves its address first (a Retry,
/// what a broker under a handshake flood asks of newcomers): the SDK answers it and
/// talks as ever. Below the threshold nobody is asked.
#[tokio::test]
async fn clients_get_through_a_quic_retry() {
    let asked = "asked to prove its address first";
    let broker = Broker::start_with(&["--quic-retry-above", "0"]);
    broker
        .create_session("proven", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let reader = broker.client("proven", "secret-pass", &key).await;
    let mut sub = reader.subscribe("t").await.expect("subscribe");
    let writer = broker.client("proven", "secret-pass", &key).await;
    writer
        .publish("t", &b"after a retry"[..])
        .await
        .expect("publish");
    let got = within("delivery", sub.next()).await.expect("a message");
    assert_eq!(&got.payload[..], b"after a retry");
    assert_eq!(
        broker.logs().matches(asked).count(),
        2,
        "both clients were asked"
    );

    let relaxed = Broker::start();
    relaxed
        .create_session("plain", "secret-pass", json!({}))
        .await;
    let _client = relaxed.client("plain", "secret-pass", &key).await;
    assert!(!relaxed.logs().contains(asked));
}
