//! File transfers across carriers: native QUIC streams, `/v1/ws` multiplexing, and the
//! legacy bridge's `init_file` / binary chunks / `end_file`, in every direction.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::dart::{Dart, key_b64};
use common::{Broker, error_code, now_ms, stream_frames, within};
use fastport::client::{Client, ClientConfig, ClientError, SessionKey};
use fastport::proto::{
    self, ErrorCode, FileChunk, FileEnd, FileHeader, PayloadFormat, client_frame, server_frame,
};
use futures::SinkExt;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// A client of session `files` over `/v1/ws`.
async fn ws_client(broker: &Broker, key: &SessionKey) -> Client {
    let url = format!("ws://{}/v1/ws", broker.http);
    let config = ClientConfig::new(url, "files", "secret-pass", key.clone());
    within("ws connect", Client::connect(config))
        .await
        .expect("connect")
}

async fn setup() -> (Broker, [u8; 32], SessionKey) {
    let broker = Broker::start();
    broker
        .create_session("files", "secret-pass", json!({}))
        .await;
    let raw: [u8; 32] = rand::random();
    let key = SessionKey::from_base64(&key_b64(&raw)).expect("key");
    (broker, raw, key)
}

#[tokio::test]
async fn native_file_over_quic_streams_to_quic_and_websocket_receivers() {
    let (broker, _, key) = setup().await;
    let quic_reader = broker.client("files", "secret-pass", &key).await;
    let ws_reader = ws_client(&broker, &key).await;
    let quic_files = quic_reader
        .subscribe_files("docs/#")
        .await
        .expect("subscribe");
    let ws_files = ws_reader
        .subscribe_files("docs/+")
        .await
        .expect("subscribe");

    // Receivers read while the file streams in: the broker never holds it whole, so
    // the sender finishes only as fast as its receivers read.
    let readers: Vec<_> = [quic_files, ws_files]
        .into_iter()
        .map(|mut files| {
            tokio::spawn(async move {
                let file = within("incoming file", files.next()).await.expect("a file");
                let meta = (
                    file.name.clone(),
                    file.topic.clone(),
                    file.format,
                    file.file_id,
                );
                (meta, within("file content", file.read_to_end()).await)
            })
        })
        .collect();
    let sender = broker.client("files", "secret-pass", &key).await;
    let content = data(5 * 1024 * 1024 + 123);
    let receipt = within(
        "upload",
        sender.send_file(
            "docs/q3",
            "report q3.pdf",
            &content[..],
            content.len() as u64,
        ),
    )
    .await
    .expect("file accepted");
    assert_eq!(receipt.bytes, content.len() as u64);
    assert_eq!(receipt.chunks, 81, "64 KiB chunks");

    for reader in readers {
        let ((name, topic, format, file_id), got) = reader.await.expect("reader");
        assert_eq!(
            name, "report q3.pdf",
            "the name is sealed and opened end to end"
        );
        assert_eq!(
            (topic.as_str(), format),
            ("docs/q3", PayloadFormat::NativeV1)
        );
        assert_eq!(file_id, receipt.file_id);
        let got = got.expect("verified");
        assert!(
            got == content,
            "content differs ({} vs {} bytes)",
            got.len(),
            content.len()
        );
    }
    // The broker saw neither the name nor the content.
    assert!(!broker.logs().contains("report q3"));
}

#[tokio::test]
async fn native_file_over_websocket_reaches_a_quic_receiver() {
    let (broker, _, key) = setup().await;
    let reader = broker.client("files", "secret-pass", &key).await;
    let mut incoming = reader.subscribe_files("up").await.expect("subscribe");
    let sender = ws_client(&broker, &key).await;
    let content = data(700_000);
    let receipt = within(
        "upload",
        sender.send_file("up", "photo.jpg", &content[..], content.len() as u64),
    )
    .await
    .expect("accepted");
    let file = within("file", incoming.next()).await.expect("file");
    assert_eq!(
        (file.name.as_str(), file.file_id),
        ("photo.jpg", receipt.file_id)
    );
    assert!(
        within("content", file.read_to_end())
            .await
            .expect("verified")
            == content
    );
}

#[tokio::test]
async fn legacy_file_reaches_legacy_and_native_receivers() {
    let (broker, raw, key) = setup().await;
    let mut dart_reader = Dart::connect(&broker, "/").await;
    dart_reader.init("files", "secret-pass", None).await;
    dart_reader
        .send(json!({"type": "subscribe", "topic": "share/#"}))
        .await;
    let native = broker.client("files", "secret-pass", &key).await;
    let mut native_files = native.subscribe_files("share/#").await.expect("subscribe");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let content = data(3 * 1024 * 1024 + 7);
    let legacy_reader = tokio::spawn(async move { dart_reader.receive_file(&raw).await });
    let native_reader = tokio::spawn(async move {
        let file = within("native file", native_files.next())
            .await
            .expect("file");
        let meta = (file.name.clone(), file.format);
        (meta, within("content", file.read_to_end()).await)
    });

    let mut dart_sender = Dart::connect(&broker, "/").await;
    dart_sender.init("files", "secret-pass", None).await;
    let id = dart_sender
        .send_file(&raw, "share/docs", "document.pdf", &content, 64 * 1024)
        .await;
    let ack = dart_sender.recv().await;
    assert_eq!(ack, json!({"type": "ack_received", "messageId": id}));

    let (init, got) = legacy_reader.await.expect("legacy reader");
    assert_eq!(init["fileName"], "document.pdf");
    assert_eq!(init["fileSize"], content.len());
    assert_eq!(init["totalChunks"], 49);
    assert_eq!(init["topic"], "share/docs");
    assert!(got == content, "legacy receiver content differs");

    let ((name, format), got) = native_reader.await.expect("native reader");
    assert_eq!(
        (name.as_str(), format),
        ("document.pdf", PayloadFormat::LegacyJson)
    );
    assert!(got.expect("hash verified") == content);
}

#[tokio::test]
async fn sdk_legacy_file_reaches_a_dart_client_but_native_files_do_not() {
    let (broker, raw, key) = setup().await;
    let mut dart = Dart::connect(&broker, "/").await;
    dart.init("files", "secret-pass", None).await;
    dart.send(json!({"type": "subscribe", "topic": "inbox"}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sender = broker.client("files", "secret-pass", &key).await;

    // A NATIVE_V1 file is not sent to a legacy client (it could not open it).
    sender
        .send_file("inbox", "native.bin", &b"sealed natively"[..], 15)
        .await
        .expect("accepted");
    assert!(dart.recv_within(Duration::from_millis(400)).await.is_none());

    let content = data(200_000);
    sender
        .send_file_legacy("inbox", "for dart.txt", &content[..], content.len() as u64)
        .await
        .expect("accepted");
    let (init, got) = dart.receive_file(&raw).await;
    assert_eq!(init["fileName"], "for dart.txt");
    assert!(got == content);
}

#[tokio::test]
async fn broken_file_transfers_are_refused() {
    let (broker, raw, key) = setup().await;
    let mut dart = Dart::connect(&broker, "/").await;
    dart.init("files", "secret-pass", None).await;

    // A chunk for a file that was never opened.
    let mut chunk = vec![0x02];
    chunk.extend_from_slice(uuid::Uuid::new_v4().to_string().as_bytes());
    chunk.extend_from_slice(&0u32.to_be_bytes());
    chunk.extend_from_slice(b"orphan");
    dart.ws.send(Message::binary(chunk)).await.expect("send");
    assert_eq!(dart.recv().await["code"], "NOT_FOUND");
    // A binary frame that is not a chunk is not a frame at all: it ends its connection.
    let mut other = Dart::connect(&broker, "/").await;
    other.init("files", "secret-pass", None).await;
    other
        .ws
        .send(Message::binary(vec![0x07; 8]))
        .await
        .expect("send");
    assert_eq!(other.recv().await["code"], "INVALID_FRAME");
    assert_eq!(other.close_code().await, Some(CloseCode::Protocol));
    // Chunks out of order abort the transfer.
    let id = uuid::Uuid::new_v4().to_string();
    dart.send(json!({"type": "init_file", "fileId": id, "fileName": "x", "fileSize": 10, "totalChunks": 2, "topic": "t"}))
        .await;
    let mut chunk = vec![0x02];
    chunk.extend_from_slice(id.as_bytes());
    chunk.extend_from_slice(&1u32.to_be_bytes());
    chunk.extend_from_slice(b"skipped zero");
    dart.ws.send(Message::binary(chunk)).await.expect("send");
    let answer = dart.recv().await;
    assert_eq!(answer["code"], "INVALID_FRAME");
    assert_eq!(answer["messageId"], id.as_str());
    // An end for an unknown file.
    dart.send(json!({"type": "end_file", "fileId": id, "hash": "00", "topic": "t"}))
        .await;
    assert_eq!(dart.recv().await["code"], "NOT_FOUND");

    // Over the broker's file size limit (declared): refused before any chunk.
    let small = Broker::start_with(&["--max-file-size", "1000"]);
    small
        .create_session("files", "secret-pass", json!({}))
        .await;
    let client = small.client("files", "secret-pass", &key).await;
    let too_big = client.send_file("t", "big", &data(5000)[..], 5000).await;
    assert!(
        matches!(
            too_big,
            Err(ClientError::Refused {
                code: ErrorCode::PayloadTooLarge,
                ..
            })
        ),
        "{too_big:?}"
    );

    // Everyone is still served.
    let mut reader = Dart::connect(&broker, "/").await;
    reader.init("files", "secret-pass", None).await;
    reader
        .send(json!({"type": "subscribe", "topic": "ok"}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    dart.send_file(&raw, "ok", "fine.txt", b"fine", 64).await;
    let (_, got) = reader.receive_file(&raw).await;
    assert_eq!(got, b"fine");
}

/// A file subscription outlives a reconnect, as a message subscription does: the SDK
/// subscribes again after the broker restarts (it used to restore only message
/// subscriptions, so a client that only received files got nothing more).
#[tokio::test]
async fn a_file_subscription_is_restored_after_a_reconnect() {
    let (mut broker, _, key) = setup().await;
    let reader = broker.client("files", "secret-pass", &key).await;
    let mut incoming = reader.subscribe_files("docs/#").await.expect("subscribe");
    let sender = broker.client("files", "secret-pass", &key).await;

    broker.restart();
    for client in [&reader, &sender] {
        within("reconnect", client.wait_for_connections(2))
            .await
            .expect("reconnected");
    }
    let content = data(100_000);
    // The reader's subscribe may land just after the sender's reconnect: retry a few
    // times, each with a fresh file.
    let mut received = None;
    for attempt in 0..20 {
        let name = format!("after-restart-{attempt}.bin");
        within(
            "upload",
            sender.send_file("docs/a", &name, &content[..], content.len() as u64),
        )
        .await
        .expect("accepted");
        if let Ok(Some(file)) =
            tokio::time::timeout(Duration::from_millis(300), incoming.next()).await
        {
            received = Some(file);
            break;
        }
    }
    let file = received.expect("a file after the restart, with no new subscribe call");
    assert!(
        within("content", file.read_to_end())
            .await
            .expect("verified")
            == content
    );
}

/// A file over the broker's `--max-file-size` is refused with the reason, over QUIC as
/// over WebSocket. Over QUIC the broker answers on the upload stream and stops reading
/// it, so the SDK's next write fails; it used to report that write ("cannot connect:
/// sending stopped by peer") instead of the broker's answer. Over WebSocket the SDK
/// stops reading the file once the refusal is back; it used to stream all of it.
#[tokio::test]
async fn a_file_over_the_size_limit_is_refused_with_the_reason() {
    let broker = Broker::start_with(&["--max-file-size", "100000"]);
    broker
        .create_session("files", "secret-pass", json!({}))
        .await;
    let key = SessionKey::generate();
    let over_ws = ws_client(&broker, &key).await;
    let over_quic = broker.client("files", "secret-pass", &key).await;
    // Larger than the stream's flow-control window, so the sender is still writing
    // when the refusal comes.
    let content = data(8_000_000);
    let size = content.len() as u64;
    // The last sender stops early for a moment, so the refusal is back before the
    // rest of its file: the SDK must answer with the refusal and read no further.
    let (paused, handed_over) =
        paused_reader(content.clone(), 300_000, Duration::from_millis(1000));
    let uploads = [
        (
            &over_quic,
            Box::new(&content[..]) as Box<dyn AsyncRead + Unpin + Send>,
        ),
        (&over_ws, Box::new(&content[..])),
        (&over_ws, Box::new(paused)),
    ];
    for (sender, reader) in uploads {
        let refused = within(
            "upload",
            sender.send_file("docs/big", "big.bin", reader, size),
        )
        .await;
        match refused {
            Err(ClientError::Refused { code, message }) => {
                assert_eq!(code, ErrorCode::PayloadTooLarge);
                assert!(message.contains("100000"), "the limit is named: {message}");
            }
            other => panic!("expected PAYLOAD_TOO_LARGE, got {other:?}"),
        }
    }
    // What the paused sender read: what it had before the pause, a chunk, and what
    // the pipe holds; not the 8 MB.
    let read = handed_over.load(Ordering::Relaxed);
    assert!(
        read < 1_000_000,
        "the refused upload read {read} bytes of {size}"
    );
}

/// Reads `content`, stopping for `pause` after its first `first` bytes; counts the
/// bytes handed to the pipe (at most 64 KiB more than were read from it).
fn paused_reader(
    content: Vec<u8>,
    first: usize,
    pause: Duration,
) -> (impl AsyncRead + Unpin, Arc<AtomicUsize>) {
    let (mut writer, reader) = tokio::io::duplex(64 * 1024);
    let handed_over = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&handed_over);
    tokio::spawn(async move {
        let _ = writer.write_all(&content[..first]).await;
        count.store(first, Ordering::Relaxed);
        tokio::time::sleep(pause).await;
        for piece in content[first..].chunks(16 * 1024) {
            if writer.write_all(piece).await.is_err() {
                return;
            }
            count.fetch_add(piece.len(), Ordering::Relaxed);
        }
    });
    (reader, handed_over)
}

/// A lost WebSocket connection ends the files it carried with an error, both ways: an
/// upload waiting for the broker's answer used to wait for ever, and a file arriving
/// stopped in the middle, for ever too.
#[tokio::test]
async fn a_lost_websocket_connection_ends_its_files_with_an_error() {
    let (mut broker, _, key) = setup().await;
    let receiver = ws_client(&broker, &key).await;
    let mut files = receiver.subscribe_files("docs/#").await.expect("subscribe");
    let uploader = ws_client(&broker, &key).await;
    let sender = broker.client("files", "secret-pass", &key).await;

    // A file arrives over WebSocket, half of it before its sender pauses.
    let content = data(1_000_000);
    let size = content.len() as u64;
    let (paused, _) = paused_reader(content, 300_000, Duration::from_secs(30));
    tokio::spawn(async move { sender.send_file("docs/big", "big.bin", paused, size).await });
    let mut arriving = within("the file", files.next()).await.expect("a file");
    let first = within("its first chunk", arriving.next_chunk()).await;
    assert!(matches!(first, Some(Ok(_))), "{first:?}");

    // An upload that is all sent, its FileEnd too, while the broker cannot answer.
    broker.stop();
    let small = data(100_000);
    let upload = tokio::spawn(async move {
        let len = small.len() as u64;
        uploader
            .send_file("docs/small", "small.bin", &small[..], len)
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    if upload.is_finished() {
        let early = upload.await.expect("join");
        panic!("the broker is stopped, yet the upload ended: {early:?}");
    }

    broker.kill9();
    let answer = within("the upload's answer", upload).await.expect("join");
    match answer {
        Err(ClientError::Transfer(why)) => assert!(why.contains("may have been accepted"), "{why}"),
        other => panic!("expected a lost connection, got {other:?}"),
    }
    let end = within("the arriving file's end", async {
        loop {
            match arriving.next_chunk().await {
                Some(Ok(_)) => continue,
                other => break other,
            }
        }
    })
    .await;
    // "connection to the broker lost", or, had its buffer been full, "ended early".
    assert!(
        matches!(end, Some(Err(ClientError::Transfer(_)))),
        "expected the file to fail, got {end:?}"
    );
}

/// A file's id is recorded once the file is accepted (design §4 and §10): an upload
/// the broker refused gives its id back, so the file can be sent again under it, and
/// only then is the id `REPLAYED`.
#[tokio::test]
async fn a_refused_upload_gives_its_file_id_back() {
    let (broker, _, _) = setup().await;
    let mut raw = broker.raw().await;
    raw.login("files", "secret-pass", "").await;
    // A receiver, so the file goes through the spool and a live stream.
    let mut receiver = broker.raw().await;
    receiver.hello("files", "secret-pass", "").await;
    receiver
        .send(client_frame::Kind::Subscribe(proto::Subscribe {
            request_id: 1,
            topic: "f/#".into(),
            ..Default::default()
        }))
        .await;
    assert!(matches!(
        receiver.next().await,
        server_frame::Kind::Subscribed(_)
    ));

    let header = client_frame::Kind::FileHeader(FileHeader {
        file_id: vec![9; 16].into(),
        topic: "f/a".into(),
        name: vec![1; 48].into(),
        size: 64,
        chunk_size: 64,
        timestamp_ms: now_ms(),
        ..Default::default()
    });
    let chunk = |index| {
        client_frame::Kind::FileChunk(FileChunk {
            index,
            payload: vec![7; 64].into(),
            ..Default::default()
        })
    };
    let end = client_frame::Kind::FileEnd(FileEnd {
        sha256: vec![0; 32].into(),
        mac: vec![0; 32].into(),
        ..Default::default()
    });

    let out_of_order = stream_frames([header.clone(), chunk(1)]);
    assert_eq!(
        error_code(&raw.upload(&out_of_order).await),
        ErrorCode::InvalidFrame
    );
    let whole = stream_frames([header, chunk(0), end]);
    let answer = raw.upload(&whole).await;
    assert!(
        matches!(answer, server_frame::Kind::FileAccepted(_)),
        "sent again after the refusal: {answer:?}"
    );
    assert_eq!(
        error_code(&raw.upload(&whole).await),
        ErrorCode::Replayed,
        "accepted once"
    );
}
