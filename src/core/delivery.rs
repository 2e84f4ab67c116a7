//! One subscriber's delivery state: the window of unacknowledged copies with their retry
//! and expiry, the bounded queue behind it, and the backlog kept in the store.
//!
//! Memory per subscriber is bounded by two limits. At most `max_inflight` copies are
//! sent and unacknowledged; at most `max_queued` more wait in memory. Past that, copies
//! *spill*: they are written to the store (durable copies are there already) and the
//! subscriber reads them back in pages, in accept order, as its window drains. A slow
//! consumer therefore costs store space, not RAM, and nothing is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::proto::{PayloadFormat, PresenceEvent};

use super::command::{
    BacklogRequest, Event, Message, MessageKind, Output, Presence, StoreOp, StoredCopy,
};
use super::session::{SessionSettings, SubOpts};
use super::topic::{TopicFilter, TopicName};
use super::types::{ClientId, ConnId, FastMap, MessageId, Millis};
use super::{Effects, Limits};

/// One subscriber's copy of a message.
#[derive(Debug, Clone)]
pub struct Copy {
    pub message: Arc<Message>,
    /// Matched a durable subscription: it is in the store until acked or given up.
    pub durable: bool,
    /// A row for it exists (or is being committed) in the store.
    pub persisted: bool,
    /// Sends to a live connection so far.
    pub attempts: u32,
    /// Made by its message's publish (not a history replay, nor read back from the
    /// store): its ack counts towards the publisher's `DELIVERED`.
    pub counted: bool,
}

#[derive(Debug)]
struct InFlight {
    copy: Copy,
    deadline: Millis,
}

/// Where the subscriber's queue continues once memory is exhausted.
#[derive(Debug, Default)]
struct Backlog {
    /// Copies newer than `cursor` may be waiting in the store.
    in_store: bool,
    /// Highest `seq` that has entered memory since the subscriber attached.
    cursor: u64,
    /// Token of the outstanding load, if any. Cleared when its answer could be stale
    /// (an unsubscribe's discard), so that the answer is ignored.
    loading: Option<u64>,
    /// A copy was spilled while a load was outstanding, so that load's answer cannot
    /// prove the store is drained.
    spilled_while_loading: bool,
}

/// A client of a session that has subscriptions, online or not.
#[derive(Debug)]
pub struct Subscriber {
    pub client_id: ClientId,
    pub conn: Option<ConnId>,
    pub legacy_only: bool,
    pub filters: BTreeMap<TopicFilter, SubOpts>,
    inflight: FastMap<MessageId, InFlight>,
    /// (deadline, id) in send order, so deadlines are ascending; stale entries are
    /// dropped from the front as acks come in, and skipped when they come up.
    retries: VecDeque<(Millis, MessageId)>,
    queue: VecDeque<Copy>,
    backlog: Backlog,
    /// Ephemeral copies of this connection are in the store.
    ephemeral_spilled: bool,
    /// Durable copies in the store may be wanted by connection-bound filters only (a
    /// durable filter was dropped, or made connection-bound, while one was left), so
    /// they are discarded when those filters end with the connection.
    pub durable_rows_outlive_filters: bool,
    /// The earliest timer registered for this subscriber's connection.
    scheduled: Option<Millis>,
    /// Files due to be sent while another is (see [`FILES_IN_FLIGHT`]), in order.
    files_waiting: VecDeque<Copy>,
}

/// Files sent to one connection at a time. Each streams from the spool on a stream of
/// its own, and clients read files one after another: more at once would only compete
/// for the connection, or block each other behind flow control.
const FILES_IN_FLIGHT: usize = 1;

/// The deadline of a file copy whose stream has not ended: its retry interval runs
/// from the end of the stream, however long a large file takes.
const STREAMING: Millis = Millis::MAX;

/// What a subscriber needs from its session and the core while it works.
pub struct Ctx<'a> {
    pub settings: &'a SessionSettings,
    pub limits: &'a Limits,
    pub fx: &'a mut Effects,
}

impl Subscriber {
    pub fn new(client_id: ClientId) -> Self {
        Self {
            client_id,
            conn: None,
            legacy_only: false,
            filters: BTreeMap::new(),
            inflight: FastMap::default(),
            retries: VecDeque::new(),
            queue: VecDeque::new(),
            backlog: Backlog::default(),
            ephemeral_spilled: false,
            durable_rows_outlive_filters: false,
            scheduled: None,
            files_waiting: VecDeque::new(),
        }
    }

    pub fn has_durable(&self) -> bool {
        self.filters.values().any(|o| o.durable)
    }

    /// Whether this subscriber's client can read payloads of `format`: a legacy
    /// connection reads only `LEGACY_JSON` (design §10), so nothing else is queued
    /// for it, nor sent to it.
    pub fn reads(&self, format: PayloadFormat) -> bool {
        !self.legacy_only || format == PayloadFormat::LegacyJson
    }

    /// Whether any of this subscriber's filters still matches `topic`.
    pub fn wants(&self, topic: &TopicName) -> bool {
        self.filters.keys().any(|f| f.matches(topic))
    }

    /// Number of copies held in memory (window + queue).
    #[cfg(test)]
    pub fn in_memory(&self) -> usize {
        self.inflight.len() + self.queue.len()
    }

    /// A connection takes this subscriber over; its queued backlog starts at once.
    pub fn attach(&mut self, conn: ConnId, legacy_only: bool, now: Millis, ctx: &mut Ctx) {
        self.conn = Some(conn);
        if self.legacy_only != legacy_only && self.has_durable() {
            // The mark is the client's, and follows its last connection: in the store
            // too, so that after a restart nothing it cannot read is queued for it,
            // and nothing it can read is withheld.
            ctx.fx.ops.push(StoreOp::SetLegacyOnly {
                session: ctx.settings.name.clone(),
                client_id: self.client_id.clone(),
                legacy_only,
            });
        }
        self.legacy_only = legacy_only;
        self.backlog = Backlog {
            in_store: self.has_durable(),
            ..Backlog::default()
        };
        self.refill(now, ctx);
    }

    /// The connection is gone: memory state is dropped, durable copies stay in the store
    /// with their attempt counts, ephemeral ones are deleted. A file copy that was
    /// only in memory is counted off here; one read back from the store is counted
    /// off when `DeleteEphemeral` reports its row (see `Effects::files`). Should that
    /// commit fail, the count stays up until a restart counts again: a spool file is
    /// kept too long, never dropped too soon.
    pub fn detach(&mut self, ctx: &mut Ctx) {
        for (_, f) in self.inflight.drain() {
            if !f.copy.durable {
                if !f.copy.persisted {
                    ctx.fx.release_file(&f.copy.message);
                }
            } else if f.copy.attempts > 0 {
                ctx.fx.ops.push(StoreOp::SetAttempts {
                    session: ctx.settings.name.clone(),
                    client_id: self.client_id.clone(),
                    seq: f.copy.message.seq,
                    attempts: f.copy.attempts,
                });
            }
        }
        for copy in self.queue.drain(..).chain(self.files_waiting.drain(..)) {
            if !copy.durable && !copy.persisted {
                ctx.fx.release_file(&copy.message);
            }
        }
        if self.ephemeral_spilled {
            ctx.fx.ops.push(StoreOp::DeleteEphemeral {
                session: ctx.settings.name.clone(),
                client_id: self.client_id.clone(),
            });
            self.ephemeral_spilled = false;
        }
        self.retries.clear();
        self.backlog = Backlog {
            in_store: true,
            ..Backlog::default()
        };
        self.scheduled = None;
        self.conn = None;
    }

    /// A new copy for this subscriber, in accept order.
    pub fn offer(&mut self, mut copy: Copy, now: Millis, ctx: &mut Ctx) {
        if self.conn.is_none() {
            // Offline: only durable subscriptions survive their connection, and their
            // copy is already on its way to the store.
            debug_assert!(copy.durable);
            self.backlog.in_store = true;
            return;
        }
        if self.backlog.in_store || self.queue.len() >= ctx.limits.max_queued {
            return self.spill(&mut copy, ctx);
        }
        self.backlog.cursor = self.backlog.cursor.max(copy.message.seq);
        if self.queue.is_empty() && self.inflight.len() < ctx.limits.max_inflight {
            self.send(copy, now, ctx);
        } else {
            self.queue.push_back(copy);
        }
    }

    /// Writes a copy that does not fit in memory to the store.
    fn spill(&mut self, copy: &mut Copy, ctx: &mut Ctx) {
        if !copy.persisted {
            ctx.fx.ops.push(StoreOp::PutMessage(copy.message.clone()));
            ctx.fx.ops.push(StoreOp::PutCopy {
                session: ctx.settings.name.clone(),
                client_id: self.client_id.clone(),
                seq: copy.message.seq,
                ephemeral: true,
                // Not persisted and not its publish's: a history replay's.
                replayed: !copy.counted,
            });
            copy.persisted = true;
            self.ephemeral_spilled = true;
        }
        self.backlog.in_store = true;
        if self.backlog.loading.is_some() {
            self.backlog.spilled_while_loading = true;
        }
    }

    fn send(&mut self, copy: Copy, now: Millis, ctx: &mut Ctx) {
        let Some(conn) = self.conn else { return };
        if copy.message.kind == MessageKind::File && !self.file_slot_free() {
            self.files_waiting.push_back(copy);
            return;
        }
        ctx.fx.outputs.push_back(Output::Send {
            conn,
            event: Event::Deliver {
                message: copy.message.clone(),
                attempt: copy.attempts + 1,
            },
        });
        self.track(copy, now, ctx);
    }

    /// A file this subscriber's connection received as it arrived: its copy counts as
    /// sent once, and is retried from the spool if no `Ack` comes.
    pub fn sent_live(&mut self, copy: Copy, now: Millis, ctx: &mut Ctx) {
        if self.conn.is_none() || self.backlog.in_store {
            // Behind a backlog in the store, a copy in memory could be read back and
            // sent twice; it takes its turn instead (the SDK drops the duplicate).
            return self.offer(copy, now, ctx);
        }
        self.backlog.cursor = self.backlog.cursor.max(copy.message.seq);
        let id = copy.message.id;
        self.track(copy, now, ctx);
        self.file_streamed(&id, now, ctx);
    }

    /// Whether a copy is past sending: expired, out of attempts, no longer wanted, or
    /// unreadable by the client now connected (a backlog queued while a native
    /// connection held the client id, or before a restart).
    fn give_up(&self, copy: &Copy, now: Millis, ctx: &Ctx) -> bool {
        now >= copy.message.expires_at
            || copy.attempts >= ctx.settings.max_attempts()
            || !self.wants(&copy.message.topic)
            || !self.reads(copy.message.format)
    }

    /// Whether another file may be sent now. This walks the whole window (a file's
    /// copy is told apart by its message), so it is asked only while a file waits: on
    /// every ack it was 6% of the broker's CPU in W1.
    fn file_slot_free(&self) -> bool {
        let files = self
            .inflight
            .values()
            .filter(|f| f.copy.message.kind == MessageKind::File)
            .count();
        files < FILES_IN_FLIGHT
    }

    /// Puts a copy just sent into the window, with its retry deadline (a file's comes
    /// when its stream ends, [`Subscriber::file_streamed`]).
    fn track(&mut self, mut copy: Copy, now: Millis, ctx: &mut Ctx) {
        let id = copy.message.id;
        copy.attempts += 1;
        let file = copy.message.kind == MessageKind::File;
        let deadline = match file {
            true => STREAMING,
            false => now.saturating_add(ctx.settings.retry_interval_ms),
        };
        // Two live messages with one id can only happen if a publisher reuses an id
        // after its replay window; the newer one supersedes the older.
        if let Some(old) = self.inflight.insert(id, InFlight { copy, deadline }) {
            self.release(old.copy, ctx);
        }
        if !file {
            self.retries.push_back((deadline, id));
            self.schedule(deadline, ctx);
        }
    }

    /// The stream of file `id` to this subscriber's connection ended (whole or not):
    /// unless it is acknowledged within the retry interval, it is sent again.
    pub fn file_streamed(&mut self, id: &MessageId, now: Millis, ctx: &mut Ctx) {
        let Some(f) = self.inflight.get_mut(id) else {
            return;
        };
        if f.deadline != STREAMING {
            return;
        }
        let deadline = now.saturating_add(ctx.settings.retry_interval_ms);
        f.deadline = deadline;
        self.retries.push_back((deadline, *id));
        self.schedule(deadline, ctx);
    }

    fn schedule(&mut self, deadline: Millis, ctx: &mut Ctx) {
        let Some(conn) = self.conn else { return };
        if self.scheduled.is_none_or(|s| deadline < s) {
            ctx.fx.timers.insert((deadline, conn));
            self.scheduled = Some(deadline);
        }
    }

    /// Forgets a copy for good (acked, expired, given up, unsubscribed).
    fn release(&mut self, copy: Copy, ctx: &mut Ctx) {
        ctx.fx.release_file(&copy.message);
        if copy.persisted {
            ctx.fx.ops.push(StoreOp::DeleteCopy {
                session: ctx.settings.name.clone(),
                client_id: self.client_id.clone(),
                seq: copy.message.seq,
            });
        }
    }

    /// The subscriber acknowledged `id`. Unknown ids (duplicates, expired) are ignored.
    pub fn ack(&mut self, id: &MessageId, now: Millis, ctx: &mut Ctx) {
        if let Some(f) = self.inflight.remove(id) {
            if f.copy.counted {
                ctx.fx.acked(f.copy.message.seq);
            }
            self.release(f.copy, ctx);
            self.drop_stale_retries();
            self.refill(now, ctx);
        }
    }

    /// Drops the retry entries at the front that no longer stand for a copy in flight
    /// (acknowledged, released, or sent again under a later entry). Acks mostly come in
    /// order, so the queue stays about the window's length rather than every copy sent
    /// in the last retry interval, and its front is a live copy: the retry timer wakes
    /// for a copy that may be due, not every millisecond for copies long acknowledged.
    fn drop_stale_retries(&mut self) {
        while let Some((deadline, id)) = self.retries.front() {
            if self
                .inflight
                .get(id)
                .is_some_and(|f| f.deadline == *deadline)
            {
                break;
            }
            self.retries.pop_front();
        }
    }

    /// A retry deadline of this subscriber's connection passed.
    pub fn on_timer(&mut self, now: Millis, ctx: &mut Ctx) {
        self.scheduled = None;
        let mut freed = false;
        loop {
            // The front is then a copy in flight under that very deadline.
            self.drop_stale_retries();
            let Some(&(deadline, id)) = self.retries.front() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.retries.pop_front();
            let Some(f) = self.inflight.remove(&id) else {
                continue;
            };
            if self.give_up(&f.copy, now, ctx) {
                self.release(f.copy, ctx);
                freed = true;
            } else {
                self.send(f.copy, now, ctx);
            }
        }
        // Refilling adds entries at the back only: the front stays live.
        if freed {
            self.refill(now, ctx);
        }
        if let Some(&(deadline, _)) = self.retries.front() {
            self.schedule(deadline, ctx);
        }
    }

    /// Moves queued copies into the window while there is room, and asks for the next
    /// page of the store backlog when memory runs dry.
    fn refill(&mut self, now: Millis, ctx: &mut Ctx) {
        if self.conn.is_none() {
            return;
        }
        // Files first, and the window scanned only when one waits (see `file_slot_free`).
        while !self.files_waiting.is_empty() && self.file_slot_free() {
            let Some(copy) = self.files_waiting.pop_front() else {
                break;
            };
            if self.give_up(&copy, now, ctx) {
                self.release(copy, ctx);
                continue;
            }
            self.send(copy, now, ctx);
        }
        while self.inflight.len() < ctx.limits.max_inflight {
            let Some(copy) = self.queue.pop_front() else {
                break;
            };
            if self.give_up(&copy, now, ctx) {
                self.release(copy, ctx);
                continue;
            }
            self.send(copy, now, ctx);
        }
        if self.queue.is_empty() && self.backlog.in_store && self.backlog.loading.is_none() {
            let token = ctx.fx.next_token();
            self.backlog.loading = Some(token);
            self.backlog.spilled_while_loading = false;
            ctx.fx.loads.push(BacklogRequest {
                session: ctx.settings.name.clone(),
                client_id: self.client_id.clone(),
                after_seq: self.backlog.cursor,
                limit: ctx.limits.max_inflight.max(ctx.limits.max_queued),
                token,
            });
        }
    }

    /// A page of the store backlog arrived. Answers to loads that are no longer
    /// outstanding (the connection changed since, or a discard made them stale) are
    /// ignored.
    pub fn backlog_loaded(
        &mut self,
        token: u64,
        rows: Vec<StoredCopy>,
        exhausted: bool,
        now: Millis,
        ctx: &mut Ctx,
    ) {
        if self.backlog.loading != Some(token) {
            return;
        }
        self.backlog.loading = None;
        for row in rows {
            if row.message.seq <= self.backlog.cursor {
                continue;
            }
            self.backlog.cursor = row.message.seq;
            self.queue.push_back(Copy {
                message: row.message,
                durable: !row.ephemeral,
                persisted: true,
                attempts: row.attempts,
                counted: false,
            });
        }
        if exhausted && !self.backlog.spilled_while_loading {
            self.backlog.in_store = false;
        }
        self.refill(now, ctx);
    }

    /// A filter was removed: copies no subscription wants any more are discarded, in
    /// memory and, when copies wait there, in the store (design §4: `Unsubscribe`
    /// discards that subscription's pending copies; left there, they would come back
    /// to a later subscription to the same topics). Whatever kind the removed filter
    /// was, stored copies may be its: a message that also matched a durable filter
    /// made a durable copy, and so did one sent before the filter was made
    /// connection-bound.
    pub fn discard_unwanted(&mut self, now: Millis, ctx: &mut Ctx) {
        // Memory first: a persisted copy released here has its row deleted before
        // the store's discard, which would otherwise count its file off again.
        let unwanted: Vec<MessageId> = self
            .inflight
            .iter()
            .filter(|(_, f)| !self.wants(&f.copy.message.topic))
            .map(|(id, _)| *id)
            .collect();
        for id in unwanted {
            if let Some(f) = self.inflight.remove(&id) {
                self.release(f.copy, ctx);
            }
        }
        let queue = std::mem::take(&mut self.queue);
        self.queue = self.keep_wanted(queue, ctx);
        let files = std::mem::take(&mut self.files_waiting);
        self.files_waiting = self.keep_wanted(files, ctx);
        if self.backlog.in_store {
            self.discard_stored(ctx);
            // A page being read may predate the discard: its answer is ignored, and
            // the next page is read after the discard commits (the store's jobs run
            // in order).
            self.backlog.loading = None;
        }
        self.refill(now, ctx);
    }

    /// The connection ended, and its connection-bound filters with it: durable copies
    /// that only they still wanted go from the store (`durable_rows_outlive_filters`).
    pub fn discard_outlived_rows(&mut self, ctx: &mut Ctx) {
        if std::mem::take(&mut self.durable_rows_outlive_filters) {
            self.discard_stored(ctx);
        }
    }

    /// Has the store drop this client's copies that no filter of it matches.
    fn discard_stored(&self, ctx: &mut Ctx) {
        ctx.fx.ops.push(StoreOp::DiscardCopies {
            session: ctx.settings.name.clone(),
            client_id: self.client_id.clone(),
            keep: self.filters.keys().cloned().collect(),
        });
    }

    /// The copies of `copies` some filter still wants; the others are released.
    fn keep_wanted(&mut self, copies: VecDeque<Copy>, ctx: &mut Ctx) -> VecDeque<Copy> {
        let mut kept = VecDeque::with_capacity(copies.len());
        for copy in copies {
            if self.wants(&copy.message.topic) {
                kept.push_back(copy);
            } else {
                self.release(copy, ctx);
            }
        }
        kept
    }

    /// Sends a presence change to this subscriber, if it is online.
    pub fn notify_presence(
        &self,
        filter: &TopicFilter,
        who: &ClientId,
        event: PresenceEvent,
        fx: &mut Effects,
    ) {
        if let Some(conn) = self.conn {
            fx.outputs.push_back(Output::Send {
                conn,
                event: Event::Presence(Box::new(Presence {
                    filter: filter.clone(),
                    client_id: who.clone(),
                    event,
                })),
            });
        }
    }
}
