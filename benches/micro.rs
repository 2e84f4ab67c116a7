//! Micro-benchmarks of the hot paths: framing, topic matching, the core's publish
//! fan-out, the replay guard, a group commit to SQLite, and the SDK's crypto.
//!
//! `cargo bench --bench micro` (add a filter, e.g. `-- topic`, to run some).

use std::hint::black_box;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fastport::carrier::framing::{self, FrameDecoder, WriteQueue};
use fastport::carrier::{Outbound, native};
use fastport::client::SessionKey;
use fastport::client::crypto::{MessageContext, SealingKeys};
use fastport::core::{
    ClientId, Command, ConnId, Core, CoreConfig, Event, Hello, Message, MessageId, MessageKind,
    Output, Publish, ReplayGuard, SessionName, SessionSettings, StoreBatch, StoreOp, TopicFilter,
    TopicName, TopicTree,
};
use fastport::proto::{self, ClientFrame, PayloadFormat, ServerFrame, client_frame, server_frame};
use fastport::store::Store;
use fastport::store::sqlite::SqliteStore;

const T0: u64 = 1_700_000_000_000;

fn framing_benches(c: &mut Criterion) {
    let deliver = ServerFrame {
        kind: Some(server_frame::Kind::Deliver(proto::Deliver {
            message_id: Bytes::from_static(&[7; 16]),
            topic: "sensors/building-1/floor-2/temperature".into(),
            payload: Bytes::from(vec![0u8; 128]),
            timestamp_ms: T0,
            format: PayloadFormat::NativeV1 as i32,
            attempt: 1,
        })),
    };
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode Deliver 128 B", |b| {
        let mut out = BytesMut::with_capacity(1 << 16);
        b.iter(|| {
            framing::encode_frame(black_box(&deliver), &mut out);
            if out.len() > 60_000 {
                out.clear();
            }
        })
    });
    // What a connection's writer does with each delivery the core hands it.
    let event = Outbound::Event(Event::Deliver {
        message: Arc::new(Message {
            session: SessionName::parse("bench").expect("valid"),
            id: MessageId([7; 16]),
            seq: 1,
            topic: TopicName::parse("sensors/building-1/floor-2/temperature").expect("valid"),
            payload: Bytes::from(vec![0u8; 128]),
            timestamp_ms: T0,
            format: PayloadFormat::NativeV1,
            kind: MessageKind::Message,
            accepted_at: T0,
            expires_at: T0 + 60_000,
        }),
        attempt: 1,
    });
    group.bench_function(
        "Deliver 128 B from the core's event, via proto::Deliver",
        |b| {
            let mut out = BytesMut::with_capacity(1 << 16);
            b.iter(|| {
                framing::encode_frame(&native::server_frame(black_box(&event)), &mut out);
                if out.len() > 60_000 {
                    out.clear();
                }
            })
        },
    );
    group.bench_function(
        "Deliver 128 B from the core's event, as the writer does",
        |b| {
            let mut queue = WriteQueue::default();
            b.iter(|| {
                native::queue_server_frame(black_box(&event), &mut queue);
                if queue.len() > 60_000 {
                    queue.clear();
                }
            })
        },
    );
    let publish = ClientFrame {
        kind: Some(client_frame::Kind::Publish(proto::Publish {
            message_id: Bytes::from_static(&[9; 16]),
            topic: "sensors/building-1/floor-2/temperature".into(),
            payload: Bytes::from(vec![0u8; 128]),
            timestamp_ms: T0,
            format: PayloadFormat::NativeV1 as i32,
        })),
    };
    let mut one = BytesMut::new();
    framing::encode_frame(&publish, &mut one);
    let many: Vec<u8> = one.iter().copied().cycle().take(one.len() * 256).collect();
    group.throughput(Throughput::Elements(256));
    group.bench_function("decode 256 Publish 128 B", |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new(1 << 20);
            d.extend(black_box(&many));
            let mut n = 0;
            while let Ok(Some(bytes)) = d.next_frame() {
                let frame: ClientFrame = framing::decode(bytes).expect("decodes");
                black_box(frame);
                n += 1;
            }
            assert_eq!(n, 256);
        })
    });
    group.finish();
}

fn topic_benches(c: &mut Criterion) {
    let mut tree = TopicTree::default();
    // 10,000 subscriptions: exact topics, one-level and multi-level wildcards.
    for i in 0..10_000u32 {
        let filter = match i % 4 {
            0 => format!("sensors/b{}/f{}/temp", i % 100, i % 17),
            1 => format!("sensors/b{}/+/temp", i % 100),
            2 => format!("sensors/b{}/#", i % 100),
            _ => format!("chat/room{i}"),
        };
        tree.insert(&TopicFilter::parse(&filter).expect("valid"), i);
    }
    let topic = TopicName::parse("sensors/b42/f8/temp").expect("valid");
    let mut group = c.benchmark_group("topics");
    group.throughput(Throughput::Elements(1));
    group.bench_function("match among 10k subscriptions", |b| {
        b.iter(|| {
            let mut hits = 0;
            tree.for_each_match(black_box(&topic), |_| hits += 1);
            black_box(hits)
        })
    });
    group.finish();
}

fn settings() -> SessionSettings {
    let mut s = SessionSettings::new(SessionName::parse("bench").expect("valid"));
    s.retry_interval_ms = 3_600_000;
    s.message_expiry_ms = 7_200_000;
    s
}

/// A core with one publisher and `subscribers` connection-bound subscribers of `t`.
fn core_with(subscribers: u64) -> Core {
    let mut core = Core::new(CoreConfig::default());
    for conn in 0..=subscribers {
        core.handle(
            T0,
            Command::Hello(Hello {
                conn: ConnId(conn),
                connection_id: [0; 16],
                settings: settings(),
                client_id: ClientId::parse(&format!("c{conn}")).expect("valid"),
                anonymous: false,
                clean: false,
                legacy_only: false,
            }),
        );
        if conn > 0 {
            core.handle(
                T0,
                Command::Subscribe {
                    conn: ConnId(conn),
                    request_id: 1,
                    filter: TopicFilter::parse("t").expect("valid"),
                    durable: false,
                    presence: false,
                    history: 0,
                },
            );
        }
    }
    while core.poll_output().is_some() {}
    core
}

/// The clock for the `n`th publish: a millisecond per 64 publishes. Ids then age out
/// of the replay guard as they would in a steady stream (about 1.9 M remembered, under
/// its 4 M cap); at a fixed time every publish past the cap's would be refused, and a
/// benchmark would time refusals.
fn clock(n: u128) -> u64 {
    T0 + (n / 64) as u64
}

/// Takes the core's outputs, as a carrier would. A refusal means the benchmark no
/// longer times the path it names.
fn drain(core: &mut Core) {
    while let Some(out) = core.poll_output() {
        if let Output::Send {
            event: Event::Error(e),
            ..
        } = &out
        {
            panic!("the core refused a publish: {}", e.reject);
        }
        black_box(out);
    }
}

/// Publishes message `n` (id `n`, 128 B on `t`) at its time on the [`clock`].
fn publish_nth(core: &mut Core, topic: &TopicName, payload: &Bytes, n: u128) {
    core.handle(
        clock(n),
        Command::Publish {
            conn: ConnId(0),
            publish: Publish {
                message_id: MessageId(n.to_be_bytes()),
                topic: topic.clone(),
                payload: payload.clone(),
                timestamp_ms: clock(n),
                format: PayloadFormat::NativeV1,
            },
        },
    );
}

/// Subscriber `conn` acknowledges message `acked`, at message `n`'s time.
fn ack_nth(core: &mut Core, conn: u64, acked: u128, n: u128) {
    core.handle(
        clock(n),
        Command::Ack {
            conn: ConnId(conn),
            message_id: MessageId(acked.to_be_bytes()),
        },
    );
}

/// Commits what the store would, and takes the outputs.
fn commit_and_drain(core: &mut Core) {
    if let Some(batch) = core.take_batch() {
        core.handle_committed(batch.id, &[]);
    }
    drain(core);
}

fn core_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("core");
    let topic = TopicName::parse("t").expect("valid");
    let payload = Bytes::from(vec![0u8; 128]);
    for subscribers in [1u64, 16] {
        group.throughput(Throughput::Elements(subscribers));
        group.bench_function(format!("publish + ack, fan-out 1->{subscribers}"), |b| {
            let mut core = core_with(subscribers);
            let mut n: u128 = 0;
            b.iter(|| {
                n += 1;
                publish_nth(&mut core, &topic, &payload, n);
                for conn in 1..=subscribers {
                    ack_nth(&mut core, conn, n, n);
                }
                commit_and_drain(&mut core);
            })
        });
    }

    // W1's shape: a window of copies in flight, each ack making room for the next
    // publish. Work that grows with the window (a walk over it per ack) shows here and
    // not above, where each copy is acknowledged before the next is sent.
    const WINDOW: u128 = 256;
    group.throughput(Throughput::Elements(1));
    group.bench_function("publish + ack, 1->1, 256 in flight", |b| {
        let mut core = core_with(1);
        let mut n: u128 = 0;
        while n < WINDOW {
            n += 1;
            publish_nth(&mut core, &topic, &payload, n);
        }
        commit_and_drain(&mut core);
        b.iter(|| {
            n += 1;
            publish_nth(&mut core, &topic, &payload, n);
            ack_nth(&mut core, 1, n - WINDOW, n);
            commit_and_drain(&mut core);
        })
    });
    group.finish();

    let mut group = c.benchmark_group("replay");
    group.throughput(Throughput::Elements(1));
    group.bench_function("admit fresh id (1M remembered)", |b| {
        let mut guard = ReplayGuard::new(30_000, 4_000_000);
        let mut n: u128 = 0;
        for _ in 0..1_000_000 {
            n += 1;
            guard
                .admit(T0, MessageId(n.to_be_bytes()), T0)
                .expect("fresh");
        }
        let mut now = T0;
        b.iter(|| {
            n += 1;
            now += 1; // ids age out as time passes, like a steady stream
            let _ = black_box(guard.admit(now, MessageId(n.to_be_bytes()), now));
        })
    });
    group.finish();
}

fn store_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = runtime
        .block_on(SqliteStore::open(&dir.path().join("bench.db")))
        .expect("open");
    let session = SessionName::parse("bench").expect("valid");
    let client = ClientId::parse("sub").expect("valid");
    let mut seq = 0u64;
    // 256 durable messages: replay id, body and copy each; with `acked`, also the
    // acknowledgements of the previous commit's 256 copies (a subscriber keeping up).
    let mut batch = |acked: bool| {
        let mut ops = Vec::with_capacity(1024);
        if acked {
            ops.extend(
                (seq.saturating_sub(255)..=seq)
                    .filter(|&s| s > 0)
                    .map(|seq| StoreOp::DeleteCopy {
                        session: session.clone(),
                        client_id: client.clone(),
                        seq,
                    }),
            );
        }
        for _ in 0..256 {
            seq += 1;
            ops.push(StoreOp::PutReplayId {
                session: session.clone(),
                id: MessageId((seq as u128).to_be_bytes()),
                expires_at: T0,
            });
            ops.push(put_message(&session, seq, "t"));
            ops.push(StoreOp::PutCopy {
                session: session.clone(),
                client_id: client.clone(),
                seq,
                ephemeral: false,
                replayed: false,
            });
        }
        StoreBatch { id: seq, ops }
    };
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(256));
    group.sample_size(20);
    for (name, acked) in [
        (
            "sqlite commit 256 durable messages, acked a commit later",
            true,
        ),
        ("sqlite commit 256 durable messages, never acked", false),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || batch(acked),
                |batch| runtime.block_on(store.commit(&[batch])).expect("commit"),
                BatchSize::SmallInput,
            )
        });
    }

    // An unsubscribe with a backlog: 10,000 copies queued in the tables, half on a
    // topic the client still subscribes to. (The store worker does nothing else
    // meanwhile, so this is how long every session's commits wait.)
    const QUEUED: u64 = 10_000;
    group.throughput(Throughput::Elements(QUEUED));
    group.sample_size(10);
    group.bench_function(
        "sqlite discard 10,000 queued copies, half still wanted",
        |b| {
            b.iter_batched(
                || {
                    // A client of its own each time, so that each discard reads as many.
                    let discarding = ClientId::parse(&format!("leaving-{seq}")).expect("valid");
                    let mut ops = Vec::with_capacity(2 * QUEUED as usize);
                    for i in 0..QUEUED {
                        seq += 1;
                        let topic = if i % 2 == 0 { "kept/1" } else { "dropped/1" };
                        ops.push(put_message(&session, seq, topic));
                        ops.push(StoreOp::PutCopy {
                            session: session.clone(),
                            client_id: discarding.clone(),
                            seq,
                            ephemeral: false,
                            replayed: false,
                        });
                    }
                    let queue = StoreBatch { id: seq, ops };
                    runtime.block_on(async {
                        store.commit(&[queue]).await.expect("commit");
                        // Folds the journal into the tables; at time 0 nothing has
                        // expired. (The kept half stays: the tables grow a little
                        // from one sample to the next.)
                        store.purge(0, 1).await.expect("purge");
                    });
                    let keep = vec![TopicFilter::parse("kept/#").expect("valid")];
                    let discard = StoreOp::DiscardCopies {
                        session: session.clone(),
                        client_id: discarding.clone(),
                        keep,
                    };
                    StoreBatch {
                        id: seq,
                        ops: vec![discard],
                    }
                },
                |batch| runtime.block_on(store.commit(&[batch])).expect("commit"),
                BatchSize::PerIteration,
            )
        },
    );
    group.finish();
}

/// A durable message's body, on `topic`. It expires at `T0`, so these benchmarks purge
/// only with a clock before it.
fn put_message(session: &SessionName, seq: u64, topic: &str) -> StoreOp {
    StoreOp::PutMessage(Arc::new(Message {
        session: session.clone(),
        id: MessageId((seq as u128).to_be_bytes()),
        seq,
        topic: TopicName::parse(topic).expect("valid"),
        payload: Bytes::from(vec![0u8; 128]),
        timestamp_ms: T0,
        format: PayloadFormat::NativeV1,
        kind: MessageKind::Message,
        accepted_at: T0,
        expires_at: T0,
    }))
}

fn crypto_benches(c: &mut Criterion) {
    let keys = SealingKeys::derive(&SessionKey::generate());
    let id = [3u8; 16];
    let ctx = MessageContext {
        session: "bench",
        topic: "sensors/b42/f8/temp",
        id: &id,
        timestamp_ms: T0,
    };
    let mut group = c.benchmark_group("crypto");
    for size in [128usize, 64 * 1024, 1024 * 1024] {
        let plain = vec![0u8; size];
        let sealed = keys.seal_message(&ctx, &plain).expect("seal");
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("seal NATIVE_V1 {size} B"), |b| {
            b.iter(|| {
                keys.seal_message(black_box(&ctx), black_box(&plain))
                    .expect("seal")
            })
        });
        group.bench_function(format!("open NATIVE_V1 {size} B"), |b| {
            b.iter(|| {
                keys.open_message(black_box(&ctx), black_box(&sealed))
                    .expect("open")
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    framing_benches,
    topic_benches,
    core_benches,
    store_benches,
    crypto_benches
);
criterion_main!(benches);
