//! The `fastport` command: run the broker, or use one from the command line.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fastport::client::{
    Client, ClientConfig, ClientError, PresenceChange, PubAck, PublishStatus, SessionKey,
    SubscribeOptions, SubscriptionEvent,
};
use fastport::config::ServeArgs;
use fastport::server::Server;
use fastport::store::StoreKind;

/// Small, short-lived allocations dominate the broker's allocator use (frames,
/// messages, per-delivery state); mimalloc serves them faster than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fastport",
    version,
    about = "fastPort: a secure, multi-tenant, QUIC-first publish/subscribe broker",
    long_about = "fastPort: a secure, multi-tenant, QUIC-first publish/subscribe broker.\n\n\
                  Without a subcommand it runs the broker (same as `fastport serve`).",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default).
    Serve(Box<ServeArgs>),
    /// Print a new random 32-byte session key, base64 (share it with clients only).
    Keygen,
    /// Manage sessions through the HTTP API.
    Session {
        #[command(subcommand)]
        command: SessionCommand,
    },
    /// Publish messages (arguments, or one per line from stdin).
    Pub(PubArgs),
    /// Subscribe and print messages as they arrive.
    Sub(SubArgs),
    /// Send a file to a topic, encrypted chunk by chunk, with a progress bar.
    SendFile(SendFileArgs),
    /// Receive files published to a topic filter into a directory.
    Recv(RecvArgs),
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Create a session (a tenant with its own password and delivery settings).
    Create(CreateArgs),
}

#[derive(Args)]
struct CreateArgs {
    /// Broker URL: http[s]://HOST:PORT, or the URL the other client commands take (the
    /// same host and port; https for wss://, and for quic:// beyond loopback).
    #[arg(long, env = "FASTPORT_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    /// CA certificate to trust for https:// [default: system roots].
    #[arg(long, env = "FASTPORT_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    #[arg(long, env = "FASTPORT_SESSION")]
    session: String,
    #[arg(long, env = "FASTPORT_PASSWORD", hide_env_values = true)]
    password: String,
    /// Milliseconds before an unacknowledged message is sent again.
    #[arg(long, value_name = "MS")]
    retry_interval: Option<u64>,
    /// Redeliveries after the first delivery.
    #[arg(long)]
    max_retries: Option<u64>,
    /// Milliseconds after which an unacknowledged message is dropped.
    #[arg(long, value_name = "MS")]
    expiry: Option<u64>,
    /// Largest payload accepted, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_payload: Option<u64>,
}

#[derive(Args)]
struct ClientArgs {
    /// Broker URL.
    #[arg(long, env = "FASTPORT_URL", default_value = "quic://127.0.0.1:3000")]
    url: String,
    /// Session name.
    #[arg(long, env = "FASTPORT_SESSION")]
    session: String,
    /// Session password.
    #[arg(long, env = "FASTPORT_PASSWORD", hide_env_values = true)]
    password: String,
    /// Session key, base64 (from `fastport keygen`); never sent to the broker.
    #[arg(long, env = "FASTPORT_KEY", hide_env_values = true)]
    key: String,
    /// CA certificate to trust [default: certs/ca.pem if it exists, else system roots].
    #[arg(long, env = "FASTPORT_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Stable client id (needed for durable subscriptions).
    #[arg(long, env = "FASTPORT_CLIENT_ID")]
    client_id: Option<String>,
}

impl ClientArgs {
    async fn connect(&self) -> Result<Client> {
        let key = SessionKey::from_base64(&self.key)
            .context("--key must be a base64 32-byte key (see `fastport keygen`)")?;
        let mut config = ClientConfig::new(&self.url, &self.session, &self.password, key);
        config.client_id = self.client_id.clone();
        config.ca = self.ca.clone().or_else(|| {
            let default = PathBuf::from("certs/ca.pem");
            default.exists().then_some(default)
        });
        Client::connect(config)
            .await
            .with_context(|| format!("connecting to {}", self.url))
    }
}

#[derive(Args)]
struct PubArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Topic to publish to.
    topic: String,
    /// Messages; without any, each line of stdin is one message.
    messages: Vec<String>,
    /// Seal as LEGACY_JSON (readable by the legacy Dart clients).
    #[arg(long)]
    legacy: bool,
    /// Publish each message this many times and report the rate and how long each
    /// publish took to be acknowledged.
    #[arg(long, default_value_t = 1)]
    repeat: u64,
    /// Publishes awaiting their PubAck at a time (1: one after another).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    in_flight: u32,
    /// Give up, and exit non-zero, when a publish has waited this many seconds for its
    /// PubAck (the client keeps reconnecting to a broker that went away until then).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
}

#[derive(Args)]
struct SubArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Topic filter (`+` matches one level, `#` the rest).
    filter: String,
    /// Keep queuing while this client is offline (needs --client-id).
    #[arg(long)]
    durable: bool,
    /// First replay up to this many retained messages (sessions with historySize).
    #[arg(long, default_value_t = 0)]
    history: u32,
    /// Also report who subscribes to the same filter and who leaves it (on stderr;
    /// with --json, as lines on stdout).
    #[arg(long)]
    presence: bool,
    /// Exit after this many messages.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Print JSON lines instead of `topic<TAB>payload`.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SendFileArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Topic to send the file to.
    topic: String,
    /// The file.
    path: PathBuf,
    /// Seal as LEGACY_JSON (readable by the legacy Dart clients).
    #[arg(long)]
    legacy: bool,
}

#[derive(Args)]
struct RecvArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Topic filter (`+` matches one level, `#` the rest).
    filter: String,
    /// Directory to save files into.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Keep queuing files while this client is offline, in the broker's spool, and
    /// receive them on the next run (needs --client-id).
    #[arg(long)]
    durable: bool,
    /// Exit after this many files.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        None => cli.serve.worker_threads()?,
        Some(Command::Serve(args)) => args.worker_threads()?,
        Some(_) => None,
    };
    let serving = matches!(cli.command, None | Some(Command::Serve(_)));
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(threads.filter(|n| *n > 0).unwrap_or_else(default_workers));
    let runtime = runtime.enable_all().build()?;
    let result = runtime.block_on(run(cli));
    if !serving {
        // `pub` reading stdin leaves a read blocked on a thread of its own when it
        // stops early (a failed publish while `tail -f` is quiet): dropping the runtime
        // would wait for that read, that is for ever.
        runtime.shutdown_background();
    }
    result
}

/// One async worker per core but one: the store's writer thread, the kernel's network
/// work and the router's own task keep the last core busy, and every extra worker adds
/// cross-thread wake-ups to each message's path.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(*args).await,
        Some(Command::Keygen) => {
            println!("{}", SessionKey::generate().to_base64());
            Ok(())
        }
        Some(Command::Session {
            command: SessionCommand::Create(args),
        }) => create_session(args).await,
        Some(Command::Pub(args)) => {
            init_logging("warn");
            publish(args).await
        }
        Some(Command::Sub(args)) => {
            init_logging("warn");
            subscribe(args).await
        }
        Some(Command::SendFile(args)) => {
            init_logging("warn");
            send_file(args).await
        }
        Some(Command::Recv(args)) => {
            init_logging("warn");
            receive_files(args).await
        }
    }
}

async fn send_file(args: SendFileArgs) -> Result<()> {
    let file = tokio::fs::File::open(&args.path)
        .await
        .with_context(|| format!("opening {}", args.path.display()))?;
    let metadata = file.metadata().await?;
    if !metadata.is_file() {
        // A file's size goes in its header, before the first chunk.
        bail!(
            "{} is not a regular file (a pipe or a device?): send-file needs its size up front; save it to a file first",
            args.path.display()
        );
    }
    let size = metadata.len();
    let name = args
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let client = args.client.connect().await?;
    let bar = progress(size, &name);
    let reader = bar.wrap_async_read(file);
    let receipt = if args.legacy {
        client
            .send_file_legacy(&args.topic, &name, reader, size)
            .await
    } else {
        client.send_file(&args.topic, &name, reader, size).await
    };
    bar.finish();
    let receipt = receipt?;
    println!(
        "sent {name} ({} bytes, {} chunks) to {}",
        receipt.bytes, receipt.chunks, args.topic
    );
    client.close().await;
    Ok(())
}

/// A file name safe to create inside the target directory.
fn safe_name(name: &str) -> String {
    let base = std::path::Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if base.is_empty() || base == "." || base == ".." {
        "received-file".into()
    } else {
        base
    }
}

async fn receive_files(args: RecvArgs) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let client = args.client.connect().await?;
    let options = SubscribeOptions {
        durable: args.durable,
        ..SubscribeOptions::default()
    };
    let mut files = client.subscribe_files_with(&args.filter, options).await?;
    tokio::fs::create_dir_all(&args.dir)
        .await
        .with_context(|| format!("creating the directory {}", args.dir.display()))?;
    let signal = on_signal();
    tokio::pin!(signal);
    eprintln!("waiting for files on {} (Ctrl-C to stop)", args.filter);
    let mut received = 0u64;
    loop {
        let mut file = tokio::select! {
            file = files.next() => match file {
                Some(file) => file,
                None => return stopped(&client),
            },
            () = &mut signal => break,
        };
        let name = safe_name(&file.name);
        // Written under a name of its own, and given its real name only once whole:
        // a failed transfer leaves nothing, and an existing file is never touched.
        let part = args.dir.join(format!(
            ".{name}.{}.part",
            hex::encode(rand::random::<[u8; 6]>())
        ));
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&part)
            .await
            .with_context(|| format!("creating {}", part.display()))?;
        let bar = progress(file.size, &file.name);
        let mut failed = None;
        let mut interrupted = false;
        loop {
            let chunk = tokio::select! {
                chunk = file.next_chunk() => chunk,
                () = &mut signal => {
                    interrupted = true;
                    break;
                }
            };
            match chunk {
                None => break,
                Some(Ok(bytes)) => {
                    if let Err(e) = out.write_all(&bytes).await {
                        let _ = tokio::fs::remove_file(&part).await;
                        return Err(e).with_context(|| format!("writing {}", part.display()));
                    }
                    bar.inc(bytes.len() as u64);
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Err(e) = out.flush().await {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e).with_context(|| format!("writing {}", part.display()));
        }
        drop(out);
        bar.finish();
        if interrupted {
            let _ = tokio::fs::remove_file(&part).await;
            eprintln!("interrupted: discarded {}", file.name);
            break;
        }
        match failed {
            None => {
                let path = keep(&part, &args.dir, &name)?;
                println!("{}\t{}", file.topic, path.display());
            }
            Some(e) => {
                let _ = tokio::fs::remove_file(&part).await;
                eprintln!("discarded {}: {e}", file.name);
            }
        }
        received += 1;
        if args.count.is_some_and(|n| received >= n) {
            break;
        }
    }
    client.close().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

/// Gives the received file at `part` the name `name` in `dir`, or, if a file of
/// that name exists, the first free one of `name (1)`, `name (2)`, … (before the
/// extension). Never replaces an existing file.
fn keep(part: &std::path::Path, dir: &std::path::Path, name: &str) -> Result<PathBuf> {
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, format!(".{ext}")),
        _ => (name, String::new()),
    };
    for n in 0..10_000u32 {
        let candidate = match n {
            0 => dir.join(name),
            n => dir.join(format!("{stem} ({n}){ext}")),
        };
        // A hard link is created only if the name is free, in one step.
        match std::fs::hard_link(part, &candidate) {
            Ok(()) => {
                std::fs::remove_file(part)
                    .with_context(|| format!("removing {}", part.display()))?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // A file system without hard links: check, then rename.
            Err(_) if !candidate.exists() => {
                std::fs::rename(part, &candidate)
                    .with_context(|| format!("saving {}", candidate.display()))?;
                return Ok(candidate);
            }
            Err(_) => continue,
        }
    }
    bail!(
        "no free name for {name} in {} (the file is kept as {})",
        dir.display(),
        part.display()
    )
}

async fn serve(args: ServeArgs) -> Result<()> {
    init_logging("info");
    let config = args.resolve()?;
    let store = match &config.store {
        StoreKind::Memory => "memory (nothing survives a restart)".to_owned(),
        StoreKind::Sqlite(path) => format!("sqlite  {}", path.display()),
    };
    // The names the generated certificate covers (a given one's are its own).
    let names = config
        .certs
        .cert
        .is_none()
        .then(|| config.certs.hosts.join(", "));
    let server = Server::start(config).await?;
    // The banner must not take the broker down if stdout is closed (`fastport | head`).
    let _ = print_banner(&server, &store, names.as_deref());

    wait_for_signal().await;
    server.shutdown().await;
    Ok(())
}

fn print_banner(server: &Server, store: &str, names: Option<&str>) -> std::io::Result<()> {
    let cert = &server.cert;
    let mut out = std::io::stdout().lock();
    writeln!(out, "fastPort {} is running", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "  store  {store}")?;
    writeln!(
        out,
        "  quic   quic://{}   (native clients, ALPN fastport/1)",
        server.quic_addr
    )?;
    let scheme = if server.https { "https" } else { "http" };
    writeln!(
        out,
        "  {scheme:<6} {scheme}://{}   (/health, /api/createSession, /v1/cert-hash)",
        server.http_addr
    )?;
    let ws = if server.https { "wss" } else { "ws" };
    writeln!(
        out,
        "  ws     {ws}://{}/v1/ws   (native clients without QUIC)",
        server.http_addr
    )?;
    writeln!(
        out,
        "  legacy {ws}://{}/   (the seeds' JSON clients; also /ws)",
        server.http_addr
    )?;
    if let Some(names) = names {
        writeln!(
            out,
            "  names  {names}   (what clients may dial; --cert-name adds more)"
        )?;
    }
    writeln!(
        out,
        "  cert   sha-256 {}  (valid until {})",
        cert.sha256_hex,
        cert.not_after_rfc3339()
    )?;
    if let Some(ca) = &cert.ca_path {
        writeln!(
            out,
            "  ca     {}   (clients: --ca {})",
            ca.display(),
            ca.display()
        )?;
    }
    let ip = server.http_addr.ip();
    if ip.is_loopback() {
        writeln!(
            out,
            "  note   bound to {ip} only; use --listen 0.0.0.0 to accept other machines"
        )?;
    } else if !server.https {
        writeln!(
            out,
            "  WARN   HTTP is plaintext and reachable beyond this machine; use --cert/--key"
        )?;
    }
    out.flush()
}

async fn wait_for_signal() {
    on_signal().await;
}

/// Completes on Ctrl-C or SIGTERM. The handlers are installed by this call, not at
/// the future's first poll, so a signal arriving in between is not missed (and does
/// not kill the process instead).
fn on_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Where the broker's HTTP API is: an `http[s]://` URL as given (a proxy may add a
/// path), or the HTTP base of the URL the other client commands take.
fn http_base(url: &str) -> Result<String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let broker = fastport::client::BrokerUrl::parse(url)
        .map_err(|e| anyhow::anyhow!("{e}; session create also takes http[s]://HOST:PORT"))?;
    Ok(broker.http_base())
}

async fn create_session(args: CreateArgs) -> Result<()> {
    let base = http_base(&args.url)?;
    let mut body = serde_json::json!({
        "sessionName": args.session,
        "password": args.password,
    });
    for (field, value) in [
        ("retryInterval", args.retry_interval),
        ("maxRetryLimit", args.max_retries),
        ("messageExpiryTime", args.expiry),
        ("maxPayloadBytes", args.max_payload),
    ] {
        if let Some(v) = value {
            body[field] = v.into();
        }
    }
    let url = format!("{base}/api/createSession");
    let mut http = reqwest::Client::builder();
    if base.starts_with("https://") {
        http = http.use_preconfigured_tls(fastport::tls::client_config(args.ca.as_deref(), None)?);
    }
    let response = http
        .build()
        .context("setting up the HTTP client")?
        .post(&url)
        .json(&body)
        .send()
        .await
        .with_context(|| {
            if args.url.starts_with("quic://") && base.starts_with("https://") {
                // A plain-HTTP broker beyond loopback can be reached, in the clear.
                format!("POST {url} (a broker beyond loopback is asked over HTTPS; --url http://… sends the password unencrypted)")
            } else {
                format!("POST {url}")
            }
        })?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.context("reading the answer")?;
    if !status.is_success() {
        let error = answer["error"].as_str().unwrap_or("no reason given");
        bail!("the broker refused ({status}): {error}");
    }
    println!("session {} created", args.session);
    if let Some(warnings) = answer["warnings"].as_array() {
        for w in warnings {
            eprintln!("warning: {}", w.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

async fn publish(args: PubArgs) -> Result<()> {
    let client = args.client.connect().await?;
    let mut source = if args.messages.is_empty() {
        Messages::Stdin(tokio::io::BufReader::new(tokio::io::stdin()).lines())
    } else {
        Messages::Args(args.messages.clone().into_iter())
    };
    let started = Instant::now();
    // Each publish is sent before the next is sealed, so they leave (and arrive) in
    // input order; up to --in-flight of them await their PubAck, each on a task of its
    // own that times it.
    let mut in_flight: VecDeque<tokio::task::JoinHandle<Acked>> = VecDeque::new();
    let mut acks = AckLog::default();
    let limit = Duration::from_secs(args.timeout);
    loop {
        // A publish that fails or times out ends `pub` even while its input is quiet
        // (`tail -f`), not only when the next line comes.
        let message = tokio::select! {
            message = source.next() => match message? {
                Some(message) => message,
                None => break,
            },
            Some(done) = oldest(&mut in_flight) => {
                in_flight.pop_front();
                acks.record(done?)?;
                continue;
            }
        };
        for _ in 0..args.repeat {
            if in_flight.len() >= args.in_flight as usize
                && let Some(oldest) = in_flight.pop_front()
            {
                acks.record(oldest.await?)?;
            }
            let sent = Instant::now();
            // The client takes a publish once its queue has room: a client stuck
            // reconnecting stops taking them.
            let handed = if args.legacy {
                let publish = client.publish_legacy_pipelined(&args.topic, &message);
                tokio::time::timeout(limit, publish).await
            } else {
                let payload = message.clone().into_bytes();
                tokio::time::timeout(limit, client.publish_pipelined(&args.topic, payload)).await
            };
            let Ok(pending) = handed else {
                bail!(
                    "the client took no publish for {} s (--timeout): the broker is unreachable",
                    limit.as_secs()
                );
            };
            let pending = pending?;
            let acked = answered(limit, pending);
            in_flight.push_back(tokio::spawn(async move { (acked.await, sent.elapsed()) }));
            while in_flight.front().is_some_and(|t| t.is_finished()) {
                if let Some(done) = in_flight.pop_front() {
                    acks.record(done.await?)?;
                }
            }
        }
    }
    for pending in in_flight {
        acks.record(pending.await?)?;
    }
    acks.report(started.elapsed(), args.in_flight);
    client.close().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

/// What `pub` publishes: its arguments, or stdin line by line as lines arrive (so
/// `tail -f log | fastport pub logs` publishes each line as it is written).
enum Messages {
    Args(std::vec::IntoIter<String>),
    Stdin(tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>),
}

impl Messages {
    async fn next(&mut self) -> std::io::Result<Option<String>> {
        match self {
            Messages::Args(args) => Ok(args.next()),
            Messages::Stdin(lines) => lines.next_line().await,
        }
    }
}

/// What `answer` gives, or an error once it has taken `limit` (`pub --timeout`): the
/// broker is gone or not answering, and the client would otherwise wait for ever.
async fn answered<T>(
    limit: Duration,
    answer: impl Future<Output = Result<T, ClientError>>,
) -> Result<T> {
    match tokio::time::timeout(limit, answer).await {
        Ok(answer) => Ok(answer?),
        Err(_) => bail!(
            "the broker did not acknowledge a publish within {} s (--timeout): it is unreachable or not answering",
            limit.as_secs()
        ),
    }
}

/// The answer of the oldest publish in flight, once it has one; `None` if there is
/// none in flight.
async fn oldest(
    in_flight: &mut VecDeque<tokio::task::JoinHandle<Acked>>,
) -> Option<Result<Acked, tokio::task::JoinError>> {
    Some(in_flight.front_mut()?.await)
}

/// A publish's answer, and how long after the call it came.
type Acked = (Result<PubAck>, Duration);

/// The answers `pub` got: the last status, and each publish's time to its `PubAck`.
#[derive(Default)]
struct AckLog {
    last: Option<PublishStatus>,
    after: Vec<Duration>,
}

impl AckLog {
    fn record(&mut self, (ack, took): Acked) -> Result<()> {
        self.last = Some(ack?.status);
        self.after.push(took);
        Ok(())
    }

    fn report(mut self, elapsed: Duration, in_flight: u32) {
        let done = self.after.len();
        if done <= 1 {
            println!("published ({})", describe(self.last));
            return;
        }
        let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
        println!(
            "published {done} messages in {:.2} s ({rate:.0} msg/s; last: {})",
            elapsed.as_secs_f64(),
            describe(self.last)
        );
        self.after.sort_unstable();
        let at = |q: f64| self.after[((done - 1) as f64 * q).round() as usize].as_micros();
        println!(
            "acknowledged after p50 {} µs, p99 {} µs, max {} µs ({in_flight} in flight at most)",
            at(0.5),
            at(0.99),
            at(1.0),
        );
    }
}

fn describe(status: Option<PublishStatus>) -> &'static str {
    match status {
        Some(PublishStatus::Stored) => "stored for durable subscribers",
        Some(PublishStatus::Accepted) => "accepted",
        Some(PublishStatus::Delivered) => "delivered",
        Some(PublishStatus::NoSubscribers) => "no subscribers",
        Some(PublishStatus::AlreadyAccepted) => "already accepted",
        None => "nothing sent",
    }
}

/// A subscription ended without being asked to: the client stopped, and says why
/// (taken over, session suspended…).
fn stopped(client: &Client) -> Result<()> {
    match client.stopped() {
        Some(why) => Err(why).context("the subscription ended"),
        None => Err(anyhow::anyhow!("the subscription ended")),
    }
}

async fn subscribe(args: SubArgs) -> Result<()> {
    let client = args.client.connect().await?;
    let options = SubscribeOptions {
        durable: args.durable,
        presence: args.presence,
        history: args.history,
    };
    let mut sub = client.subscribe_with(&args.filter, options).await?;
    let signal = on_signal();
    eprintln!("subscribed to {} (Ctrl-C to stop)", args.filter);
    let mut seen = 0u64;
    let mut stdout = std::io::stdout();
    // On Ctrl-C or SIGTERM the client says goodbye, so the broker stops delivering to
    // this connection at once instead of when QUIC's idle timeout ends it (a durable
    // subscription then queues what follows).
    tokio::pin!(signal);
    loop {
        let event = tokio::select! {
            event = sub.next_event() => match event {
                Some(event) => event,
                None => return stopped(&client),
            },
            () = &mut signal => break,
        };
        let message = match event {
            SubscriptionEvent::Message(message) => message,
            SubscriptionEvent::Presence(change) => {
                let (event, client_id) = match &change {
                    PresenceChange::Joined { client_id } => ("joined", client_id),
                    PresenceChange::Left { client_id } => ("left", client_id),
                };
                if args.json {
                    let line = serde_json::json!({"presence": event, "client_id": client_id});
                    writeln!(stdout, "{line}")?;
                    stdout.flush()?;
                } else {
                    eprintln!("{client_id} {event} {}", args.filter);
                }
                continue;
            }
        };
        if args.json {
            let line = serde_json::json!({
                "topic": message.topic,
                "payload": String::from_utf8_lossy(&message.payload),
                "message_id": hex::encode(message.message_id),
                "timestamp_ms": message.timestamp_ms,
                "attempt": message.attempt,
            });
            writeln!(stdout, "{line}")?;
        } else {
            writeln!(
                stdout,
                "{}\t{}",
                message.topic,
                String::from_utf8_lossy(&message.payload)
            )?;
        }
        stdout.flush()?;
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    client.close().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}
