//! Delivery guarantees through the real broker binary: retries, expiry, replay
//! protection, crash safety (`kill -9`) and SDK reconnection.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, Raw, durable, error_code, now_ms, publish, within};
use fastport::client::{Client, ClientConfig, Message, PublishStatus, SessionKey, Subscription};
use fastport::proto::{self, ErrorCode, client_frame, server_frame};
use serde_json::{Value, json};

/// The password of every session these tests create.
const PASSWORD: &str = "secret-pass";

/// A broker with the session `name` created on it, with `settings`.
async fn broker_with(name: &str, settings: Value) -> Broker {
    let broker = Broker::start();
    broker.create_session(name, PASSWORD, settings).await;
    broker
}

/// A client configuration for `session` that resumes as `client_id`.
fn config_as(broker: &Broker, session: &str, key: &SessionKey, client_id: &str) -> ClientConfig {
    broker
        .client_config(session, PASSWORD, key)
        .client_id(client_id)
}

fn subscribe(topic: &str, durable: bool) -> client_frame::Kind {
    client_frame::Kind::Subscribe(proto::Subscribe {
        request_id: 1,
        topic: topic.into(),
        durable,
        history: 0,
        presence: false,
    })
}

async fn subscriber(broker: &Broker, session: &str, topic: &str) -> Raw {
    let mut raw = broker.raw().await;
    raw.login(session, PASSWORD, "").await;
    raw.send(subscribe(topic, false)).await;
    assert!(matches!(
        raw.next().await,
        server_frame::Kind::Subscribed(_)
    ));
    raw
}

/// A client with `config`'s `client_id` and its durable subscription to `topic`.
async fn durable_reader(config: &ClientConfig, topic: &str) -> (Client, Subscription) {
    let reader = within("connect", Client::connect(config.clone()))
        .await
        .expect("connect");
    let options = durable();
    let sub = reader
        .subscribe_with(topic, options)
        .await
        .expect("subscribe");
    (reader, sub)
}

/// Publishes `payload` on `topic` every 200 ms, at most 50 times, until `sub` has a
/// message: for a subscription the SDK is restoring, which takes a moment. `None` if
/// the subscription ended or nothing came.
async fn publish_until_delivered(
    writer: &Client,
    sub: &mut Subscription,
    topic: &str,
    payload: &[u8],
) -> Option<Message> {
    for _ in 0..50 {
        writer
            .publish(topic, payload.to_vec())
            .await
            .expect("publish");
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            return m;
        }
    }
    None
}

/// Attempts seen on `raw` until `quiet` passes with nothing new.
async fn attempts(raw: &mut Raw, quiet: Duration) -> Vec<(u32, Instant)> {
    let mut seen = Vec::new();
    while let Some(frame) = raw.next_within(quiet).await {
        if let Some(server_frame::Kind::Deliver(d)) = frame.kind {
            seen.push((d.attempt, Instant::now()));
        }
    }
    seen
}

#[tokio::test]
async fn unacknowledged_delivery_is_retried_up_to_the_limit() {
    let settings = json!({"retryInterval": 400, "maxRetryLimit": 3});
    let broker = broker_with("retry", settings).await;
    let mut raw = subscriber(&broker, "retry", "jobs").await;

    let key = SessionKey::generate();
    let publisher = broker.client("retry", PASSWORD, &key).await;
    publisher
        .publish("jobs", b"work".to_vec())
        .await
        .expect("publish");

    let seen = attempts(&mut raw, Duration::from_millis(2_000)).await;
    let numbers: Vec<u32> = seen.iter().map(|(a, _)| *a).collect();
    assert_eq!(
        numbers,
        vec![1, 2, 3, 4],
        "first delivery plus 3 retries, then nothing"
    );
    // Spaced by the interval, not sent in a burst. (Half of it: on a loaded machine
    // one delivery may reach the client late and the next on time.)
    for pair in seen.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= Duration::from_millis(200),
            "retries {gap:?} apart, interval is 400 ms"
        );
    }
}

#[tokio::test]
async fn nothing_is_redelivered_after_expiry() {
    let settings = json!({"retryInterval": 200, "maxRetryLimit": 1000, "messageExpiryTime": 1000});
    let broker = broker_with("expiry", settings).await;
    let mut raw = subscriber(&broker, "expiry", "jobs").await;

    let key = SessionKey::generate();
    let publisher = broker.client("expiry", PASSWORD, &key).await;
    let sent = Instant::now();
    publisher
        .publish("jobs", b"work".to_vec())
        .await
        .expect("publish");

    let seen = attempts(&mut raw, Duration::from_millis(1_500)).await;
    assert!(
        seen.len() >= 3,
        "retried while fresh: {} deliveries",
        seen.len()
    );
    let last = seen.last().map(|(_, at)| *at - sent).unwrap_or_default();
    assert!(
        last <= Duration::from_millis(1_150),
        "delivered {last:?} after publishing; expiry is 1 s"
    );
}

#[tokio::test]
async fn acked_delivery_is_not_repeated() {
    // A retry interval far longer than an ack takes, even on a loaded machine (the
    // other tests of this file start brokers and hash passwords alongside).
    let broker = broker_with("acks", json!({"retryInterval": 1_000})).await;
    let mut raw = subscriber(&broker, "acks", "jobs").await;
    let key = SessionKey::generate();
    let publisher = broker.client("acks", PASSWORD, &key).await;
    publisher
        .publish("jobs", b"work".to_vec())
        .await
        .expect("publish");
    let server_frame::Kind::Deliver(d) = raw.next().await else {
        panic!("expected Deliver")
    };
    raw.send(client_frame::Kind::Ack(proto::Ack {
        message_id: d.message_id,
    }))
    .await;
    assert!(
        attempts(&mut raw, Duration::from_millis(2_500))
            .await
            .is_empty(),
        "redelivered after its ack"
    );
}

#[tokio::test]
async fn replays_and_stale_timestamps_are_refused() {
    let broker = broker_with("replay", json!({})).await;
    let mut raw = broker.raw().await;
    raw.hello("replay", PASSWORD, "").await;

    let id: [u8; 16] = rand::random();
    raw.send(publish(id, "t", now_ms())).await;
    assert!(matches!(raw.next().await, server_frame::Kind::PubAck(_)));
    raw.send(publish(id, "t", now_ms())).await;
    let answer = raw.next().await;
    assert_eq!(error_code(&answer), ErrorCode::Replayed);
    if let server_frame::Kind::Error(e) = &answer {
        assert_eq!(
            e.message_id.as_ref(),
            &id,
            "the error names the refused message"
        );
    }

    raw.send(publish(rand::random(), "t", now_ms() - 31_000))
        .await;
    assert_eq!(error_code(&raw.next().await), ErrorCode::StaleTimestamp);
    raw.send(publish(rand::random(), "t", now_ms() + 31_000))
        .await;
    assert_eq!(error_code(&raw.next().await), ErrorCode::StaleTimestamp);

    // The connection lives on after refusals.
    raw.send(publish(rand::random(), "t", now_ms())).await;
    assert!(matches!(raw.next().await, server_frame::Kind::PubAck(_)));

    // A replayed id is still refused after a restart (ids are committed with messages).
    let mut broker = broker;
    broker.restart();
    let mut raw = broker.raw().await;
    raw.hello("replay", PASSWORD, "").await;
    raw.send(publish(id, "t", now_ms())).await;
    assert_eq!(error_code(&raw.next().await), ErrorCode::Replayed);
}

#[tokio::test]
async fn acknowledged_publishes_survive_kill_9() {
    let mut broker = broker_with("crash", json!({})).await;
    let key = SessionKey::generate();
    let config = config_as(&broker, "crash", &key, "survivor");
    let (reader, sub) = durable_reader(&config, "events").await;
    drop(sub);
    reader.close().await;

    // Publish a burst concurrently, keep every PubAck, and kill -9 right after.
    let publisher = broker.client("crash", PASSWORD, &key).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300u32 {
        let p = publisher.clone();
        tasks.spawn(async move { (i, p.publish("events", i.to_be_bytes().to_vec()).await) });
    }
    let mut acked = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.expect("task");
        let ack = result.expect("publish");
        assert_eq!(ack.status, PublishStatus::Stored);
        acked.push(i);
    }
    broker.kill9();
    drop(publisher);
    broker.restart();

    let (_reader, mut sub) = durable_reader(&config, "events").await;
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let m = within("every acknowledged message", sub.next())
            .await
            .expect("message");
        got.push(u32::from_be_bytes(
            m.payload[..4].try_into().expect("4 bytes"),
        ));
    }
    acked.sort_unstable();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, acked, "every acknowledged message, exactly once");
}

#[tokio::test]
async fn sdk_resumes_by_itself_when_the_broker_restarts() {
    let mut broker = broker_with("resume", json!({})).await;
    let key = SessionKey::generate();
    let reader = broker.client("resume", PASSWORD, &key).await;
    let mut sub = reader.subscribe("news/#").await.expect("subscribe");
    let writer = broker.client("resume", PASSWORD, &key).await;
    writer
        .publish("news/1", b"before".to_vec())
        .await
        .expect("publish");
    assert_eq!(
        within("before", sub.next()).await.expect("msg").payload,
        &b"before"[..]
    );

    broker.restart();
    within("reader reconnect", reader.wait_for_connections(2))
        .await
        .expect("reconnect");
    within("writer reconnect", writer.wait_for_connections(2))
        .await
        .expect("reconnect");

    // The subscription was restored by the SDK: no new subscribe call.
    let delivered = publish_until_delivered(&writer, &mut sub, "news/2", b"after").await;
    assert_eq!(
        delivered.expect("delivered after restart").payload,
        &b"after"[..]
    );
}

/// A subscription the SDK restores after a reconnect, which the broker refuses for
/// now (here: the session has as many subscribed clients as `--max-session-clients`
/// lets it), is asked for again until the broker takes it, instead of ending.
#[tokio::test]
async fn sdk_asks_again_for_a_subscription_refused_for_now() {
    let mut broker = broker_with("full", json!({})).await;
    let key = SessionKey::generate();
    let reader = broker.client("full", PASSWORD, &key).await;
    let mut sub = reader.subscribe("t").await.expect("subscribe");
    // Two durable subscribers, offline, hold both places after a restart with room
    // for two subscribed clients.
    for name in ["d1", "d2"] {
        let (client, _) = durable_reader(&config_as(&broker, "full", &key, name), "d").await;
        client.close().await;
    }
    broker.restart_with(&["--max-session-clients", "2"]);
    within("reader reconnect", reader.wait_for_connections(2))
        .await
        .expect("reconnect");
    within("the refusal", async {
        while !broker.logs().contains("as many subscribed clients") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // d1 leaves for good, which frees a place.
    let (d1, d1_sub) = durable_reader(&config_as(&broker, "full", &key, "d1"), "d").await;
    d1_sub.unsubscribe().await.expect("unsubscribe");
    d1.close().await;
    let writer = broker.client_when_room("full", PASSWORD, &key).await;
    let delivered = publish_until_delivered(&writer, &mut sub, "t", b"taken again").await;
    let m = delivered.expect("the subscription was taken again, not ended");
    assert_eq!(m.payload, &b"taken again"[..]);
}

/// A `subscribe()` or `unsubscribe()` whose answer went with the connection
/// completes: the subscription is restored with the others on reconnecting, and the
/// ending (of a durable subscription, which would outlive it) is sent again.
#[tokio::test]
async fn sdk_calls_in_flight_when_the_connection_is_lost_complete() {
    let mut broker = broker_with("inflight", json!({})).await;
    let key = SessionKey::generate();
    let reader = broker.client("inflight", PASSWORD, &key).await;
    let config = config_as(&broker, "inflight", &key, "leaving");
    let (leaving, durable_sub) = durable_reader(&config, "d").await;

    broker.kill9();
    let subscribing = tokio::spawn({
        let reader = reader.clone();
        async move { reader.subscribe("t").await }
    });
    let unsubscribing = tokio::spawn(durable_sub.unsubscribe());
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.restart();
    let mut sub = within("subscribe in flight", subscribing)
        .await
        .expect("task")
        .expect("subscribed");
    within("unsubscribe in flight", unsubscribing)
        .await
        .expect("task")
        .expect("unsubscribed");
    within("reconnect", leaving.wait_for_connections(2))
        .await
        .expect("reconnect");
    within("reconnect", reader.wait_for_connections(2))
        .await
        .expect("reconnect");

    let writer = broker.client("inflight", PASSWORD, &key).await;
    let delivered = publish_until_delivered(&writer, &mut sub, "t", b"restored").await;
    assert_eq!(delivered.expect("delivered").payload, &b"restored"[..]);
    let ack = writer
        .publish("d", b"nobody".to_vec())
        .await
        .expect("publish");
    assert_eq!(ack.status, PublishStatus::NoSubscribers);
}

/// Without `reconnect`, a `subscribe()` in flight when the connection is lost fails:
/// the client stops, and nothing restores the subscription.
#[tokio::test]
async fn sdk_without_reconnect_fails_a_subscribe_in_flight() {
    let mut broker = broker_with("once", json!({})).await;
    let key = SessionKey::generate();
    let config = broker
        .client_config("once", PASSWORD, &key)
        .reconnect(false);
    let client = within("connect", Client::connect(config))
        .await
        .expect("connect");
    broker.kill9();
    let subscribing = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe("t").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.restart();
    let outcome = within("subscribe in flight", subscribing)
        .await
        .expect("task");
    assert!(outcome.is_err(), "the client stopped");
}

#[tokio::test]
async fn sdk_publish_during_an_outage_is_delivered_after_it() {
    let mut broker = broker_with("outage", json!({})).await;
    let key = SessionKey::generate();
    let config = config_as(&broker, "outage", &key, "reader");
    let (_reader, mut sub) = durable_reader(&config, "t").await;
    let writer = broker.client("outage", PASSWORD, &key).await;

    broker.kill9();
    let pending = tokio::spawn({
        let writer = writer.clone();
        async move { writer.publish("t", b"sent while down".to_vec()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.restart();
    let ack = within("publish after restart", pending)
        .await
        .expect("join")
        .expect("publish");
    assert!(matches!(
        ack.status,
        PublishStatus::Stored | PublishStatus::AlreadyAccepted
    ));
    let m = within("delivery", sub.next()).await.expect("message");
    assert_eq!(m.payload, &b"sent while down"[..]);
}

#[tokio::test]
async fn sigterm_flushes_and_exits_cleanly() {
    let mut broker = broker_with("term", json!({})).await;
    let key = SessionKey::generate();
    let config = config_as(&broker, "term", &key, "reader");
    let (reader, sub) = durable_reader(&config, "t").await;
    drop(sub);
    reader.close().await;

    let mut raw = broker.raw().await;
    raw.hello("term", PASSWORD, "").await;
    let writer = broker.client("term", PASSWORD, &key).await;
    for i in 0..20u8 {
        writer.publish("t", vec![i]).await.expect("publish");
    }
    let status = broker.terminate();
    assert!(status.success(), "exit status {status}");
    // Connections were closed with a reason, not left to time out.
    assert!(raw.closed_within(Duration::from_secs(2)).await);
    let reason = raw
        .conn
        .close_reason()
        .map(|r| r.to_string())
        .unwrap_or_default();
    assert!(reason.contains("shutting down"), "close reason: {reason}");
    assert!(broker.logs().contains("store flushed and closed"));

    broker.restart();
    let (_reader, mut sub) = durable_reader(&config, "t").await;
    for i in 0..20u8 {
        let m = within("backlog", sub.next()).await.expect("message");
        assert_eq!(m.payload.as_ref(), &[i]);
    }
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_gets_everything_later_and_slows_no_one() {
    let broker = broker_with("slow", json!({"retryInterval": 600000})).await;
    let mut slow = subscriber(&broker, "slow", "feed").await;
    let key = SessionKey::generate();
    let fast = broker.client("slow", PASSWORD, &key).await;
    let mut fast_sub = fast.subscribe("feed").await.expect("subscribe");
    let publisher = broker.client("slow", PASSWORD, &key).await;

    // Far more than the slow subscriber's window and queue: the rest spills to the store.
    const N: u32 = 3000;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let p = publisher.clone();
        tasks.spawn(async move { p.publish("feed", i.to_be_bytes().to_vec()).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("publish");
    }
    let mut fast_got = 0;
    while fast_got < N {
        within("fast subscriber", fast_sub.next())
            .await
            .expect("message");
        fast_got += 1;
    }

    // Now the slow one reads and acknowledges: every message, each once, as first delivery.
    let mut seen = std::collections::BTreeSet::new();
    let mut firsts = 0;
    while seen.len() < N as usize {
        let Some(frame) = slow.next_within(Duration::from_secs(10)).await else {
            panic!("slow subscriber stalled after {} messages", seen.len());
        };
        if let Some(server_frame::Kind::Deliver(d)) = frame.kind {
            if d.attempt == 1 {
                firsts += 1;
            }
            seen.insert(d.message_id.clone());
            slow.send(client_frame::Kind::Ack(proto::Ack {
                message_id: d.message_id,
            }))
            .await;
        }
    }
    assert_eq!(firsts, N, "no message needed a retry");
}

/// The SDK holds acks for a moment to write several in one go; a lone delivery with
/// nothing after it must still be acknowledged on its own, not only when the client
/// next writes or closes. Killed without a chance to close, the subscriber's
/// durable copy is gone after a restart only if its ack was written in time.
#[tokio::test]
async fn sdk_acknowledges_a_lone_delivery_without_further_traffic() {
    let mut broker = broker_with("lone", json!({})).await;
    let key = SessionKey::generate();
    let config = config_as(&broker, "lone", &key, "lone-reader");
    let (reader, mut sub) = durable_reader(&config, "events").await;
    let publisher = broker.client("lone", PASSWORD, &key).await;
    publisher
        .publish("events", b"only one".to_vec())
        .await
        .expect("publish");
    let got = within("the delivery", sub.next()).await.expect("message");
    assert_eq!(&got.payload[..], b"only one");

    // Far longer than the SDK holds an ack and the broker takes to commit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.kill9();
    drop((sub, reader, publisher));
    broker.restart();

    let (_reader, mut sub) = durable_reader(&config, "events").await;
    let again = tokio::time::timeout(Duration::from_millis(1_500), sub.next()).await;
    assert!(
        again.is_err(),
        "delivered again after a restart: its ack was never written"
    );
}

/// The SDK acknowledges a message when the application takes it, not when it reaches
/// the subscription's buffer: a subscriber that takes one of five and then goes
/// away gets the other four again on its next connection, and not the one it took.
#[tokio::test]
async fn messages_the_application_never_took_are_delivered_again() {
    for url in ["quic", "ws"] {
        let broker = broker_with("take", json!({})).await;
        let key = SessionKey::generate();
        let mut config = config_as(&broker, "take", &key, "taker");
        if url == "ws" {
            config.url = format!("ws://{}/v1/ws", broker.http);
        }
        let (reader, mut sub) = durable_reader(&config, "jobs").await;
        let publisher = broker.client("take", PASSWORD, &key).await;
        for i in 0..5 {
            publisher
                .publish("jobs", format!("job {i}").into_bytes())
                .await
                .expect("publish");
        }
        let first = within("the first job", sub.next()).await.expect("message");
        assert_eq!(&first.payload[..], b"job 0");
        // All five are in the subscription's buffer by now; only one was taken.
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(sub);
        reader.close().await;
        drop(reader);

        let (_reader, mut sub) = durable_reader(&config, "jobs").await;
        for i in 1..5 {
            let m = within("a job never taken", sub.next())
                .await
                .expect("message");
            assert_eq!(m.payload, format!("job {i}").into_bytes(), "over {url}");
        }
        let more = tokio::time::timeout(Duration::from_millis(1_000), sub.next()).await;
        assert!(
            more.is_err(),
            "over {url}: the job taken was delivered again"
        );
    }
}

/// A durable backlog that arrives before the application subscribes again is held
/// by the SDK, and reaches the subscription once, however often the broker sent it
/// again meanwhile (design §4: SDKs drop duplicates by `message_id`).
#[tokio::test]
async fn a_backlog_waiting_for_its_subscription_reaches_it_once() {
    let broker = broker_with("late", json!({"retryInterval": 300})).await;
    let key = SessionKey::generate();
    let config = config_as(&broker, "late", &key, "late");
    let (reader, sub) = durable_reader(&config, "jobs").await;
    drop(sub);
    reader.close().await;
    drop(reader);
    let publisher = broker.client("late", PASSWORD, &key).await;
    for i in 0..3 {
        publisher
            .publish("jobs", format!("job {i}").into_bytes())
            .await
            .expect("publish");
    }

    let reader = within("connect", Client::connect(config.clone()))
        .await
        .expect("connect");
    // The backlog arrives at once and is sent again every 300 ms while no
    // subscription takes it.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let options = durable();
    let mut sub = reader
        .subscribe_with("jobs", options)
        .await
        .expect("subscribe");
    for i in 0..3 {
        let m = within("a job", sub.next()).await.expect("message");
        assert_eq!(m.payload, format!("job {i}").into_bytes());
    }
    let more = tokio::time::timeout(Duration::from_millis(1_000), sub.next()).await;
    assert!(more.is_err(), "a job came twice: {more:?}");
}

/// A message handed to two subscriptions of one client is acknowledged once either
/// takes it, even after the other was dropped unread: it is not delivered again.
#[tokio::test]
async fn a_copy_given_back_unread_does_not_undo_the_other() {
    let broker = broker_with("copies", json!({"retryInterval": 300})).await;
    let key = SessionKey::generate();
    let reader = broker.client("copies", PASSWORD, &key).await;
    let mut wide = reader.subscribe("t/#").await.expect("subscribe");
    let narrow = reader.subscribe("t/x").await.expect("subscribe");
    let publisher = broker.client("copies", PASSWORD, &key).await;
    publisher
        .publish("t/x", b"one".to_vec())
        .await
        .expect("publish");
    // Both subscriptions hold a copy by now; one is dropped without reading it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(narrow);
    let got = within("the message", wide.next()).await.expect("message");
    assert_eq!(&got.payload[..], b"one");
    let again = tokio::time::timeout(Duration::from_millis(1_500), wide.next()).await;
    assert!(again.is_err(), "delivered again: its ack was never written");
}
