//! muster's backplane: the outbox (durable events and directed commands
//! every service appends in the transaction of its state change) and its
//! delivery to edges. Reads are per tenant and never cross tenants.
#![forbid(unsafe_code)]

pub mod directory;

use std::sync::Arc;
use std::time::Duration;

use muster_mesh::{Rule, ServiceSpec, to_status};
use muster_proto::v1 as pb;
use muster_proto::v1::backplane_server::{Backplane, BackplaneServer};
use muster_store::lease::Tenure;
use muster_store::outbox::{self, Consumer, Depth, Item, Retention, Target};

use crate::directory::{Directory, DirectoryStore, Registration};
use muster_store::{Backend, Store, StoreError};
use muster_tls::ServiceName::{Ctl, Edge};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The most items one read returns.
pub const MAX_READ: u32 = 1000;

/// How often a subscription looks for new items when nothing woke it: the
/// correctness fallback for commits made by other processes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How many items one sequencing round positions at most.
pub const MAX_SEQUENCE: i64 = 5000;

/// Where the backplane reads the outbox from.
#[tonic::async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    async fn read_after(
        &self,
        tenant_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Item>, StoreError>;
    async fn read_all_after(&self, after: i64, limit: u32) -> Result<outbox::Page, StoreError>;
    async fn read_all_from(&self, from: i64, limit: u32) -> Result<outbox::Page, StoreError>;
    /// The event ids at positions `from` through `through`.
    async fn event_ids_between(
        &self,
        from: i64,
        through: i64,
    ) -> Result<Vec<(i64, String)>, StoreError>;
    async fn head(&self) -> Result<i64, StoreError>;
    async fn position_of(&self, tenant_id: &str, event_id: &str)
    -> Result<Option<i64>, StoreError>;
    /// Positions committed items (see [`muster_store::outbox::sequence`]).
    async fn sequence(&self, limit: i64) -> Result<u64, StoreError>;
    /// Whether items get their positions from a sequencer after commit
    /// (Postgres) rather than at insert (SQLite).
    fn sequenced_after_commit(&self) -> bool;
    async fn ack(&self, consumer_id: &str, position: i64) -> Result<(), StoreError>;
    async fn progress(&self, consumer_id: &str) -> Result<Option<i64>, StoreError>;
    async fn compact(&self, retention: &Retention) -> Result<u64, StoreError>;
    async fn depth(&self) -> Result<(Depth, Vec<Consumer>), StoreError>;
    async fn lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, StoreError>;
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
    /// Changes when this process commits a transaction.
    fn commits(&self) -> watch::Receiver<u64>;
    /// Changes when `channel` is notified by any process (Postgres).
    fn listen(&self, channel: &'static str) -> Option<watch::Receiver<u64>>;
}

#[tonic::async_trait]
impl OutboxStore for Store {
    async fn read_after(
        &self,
        tenant_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Item>, StoreError> {
        outbox::read_after(self, tenant_id, after, limit).await
    }

    async fn read_all_after(&self, after: i64, limit: u32) -> Result<outbox::Page, StoreError> {
        outbox::read_all_after(self, after, limit).await
    }

    async fn read_all_from(&self, from: i64, limit: u32) -> Result<outbox::Page, StoreError> {
        outbox::read_all_from(self, from, limit).await
    }

    async fn event_ids_between(
        &self,
        from: i64,
        through: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        outbox::event_ids_between(self, from, through).await
    }

    async fn head(&self) -> Result<i64, StoreError> {
        outbox::head(self).await
    }

    async fn position_of(
        &self,
        tenant_id: &str,
        event_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        outbox::position_of(self, tenant_id, event_id).await
    }

    async fn sequence(&self, limit: i64) -> Result<u64, StoreError> {
        outbox::sequence(self, limit).await
    }

    fn sequenced_after_commit(&self) -> bool {
        self.backend() == Backend::Postgres
    }

    async fn ack(&self, consumer_id: &str, position: i64) -> Result<(), StoreError> {
        outbox::ack(self, consumer_id, position).await
    }

    async fn progress(&self, consumer_id: &str) -> Result<Option<i64>, StoreError> {
        outbox::progress(self, consumer_id).await
    }

    async fn compact(&self, retention: &Retention) -> Result<u64, StoreError> {
        outbox::compact(self, retention).await
    }

    async fn depth(&self) -> Result<(Depth, Vec<Consumer>), StoreError> {
        Ok((outbox::depth(self).await?, outbox::consumers(self).await?))
    }

    async fn lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, StoreError> {
        muster_store::lease::acquire(self, name, holder, ttl_ms).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        muster_store::lease::release(self, name, holder).await
    }

    fn commits(&self) -> watch::Receiver<u64> {
        Store::commits(self)
    }

    fn listen(&self, channel: &'static str) -> Option<watch::Receiver<u64>> {
        Store::listen(self, channel)
    }
}

/// Reading the outbox.
#[derive(Clone)]
pub struct Outbox {
    store: Arc<dyn OutboxStore>,
    /// The tail: every item as it becomes readable, read once for all
    /// followers.
    tail: Arc<broadcast::Sender<Published>>,
    /// True once the tail knows where it starts.
    tail_ready: watch::Receiver<bool>,
    /// The rewinds the tail found: a follower that missed the tail's word
    /// (behind by more than the tail keeps) learns of them here.
    rewinds: watch::Receiver<Rewinds>,
}

/// What the tail publishes.
#[derive(Clone)]
enum Published {
    /// Items the tail read together, oldest first.
    Items(Arc<[Item]>),
    /// The outbox's history was rewound under the tail (where it parted
    /// from what the tail read is in [`Outbox::rewinds`]): a follower past
    /// that point goes back to it (with a gap) and catches up from the
    /// store again.
    Rewound,
}

/// How many rewinds the tail found, and where they parted from what it
/// had read.
#[derive(Debug, Default, Clone)]
struct Rewinds {
    count: u64,
    /// (count, where it parted) of the last [`REWINDS_KEPT`].
    recent: std::collections::VecDeque<(u64, i64)>,
    /// The lowest point of those no longer kept.
    dropped: Option<i64>,
}

/// How many rewinds [`Rewinds`] keeps where they parted.
const REWINDS_KEPT: usize = 16;

impl Rewinds {
    fn push(&mut self, parted: i64) {
        self.count += 1;
        self.recent.push_back((self.count, parted));
        if self.recent.len() > REWINDS_KEPT
            && let Some((_, dropped)) = self.recent.pop_front()
        {
            self.dropped = Some(self.dropped.map_or(dropped, |lowest| lowest.min(dropped)));
        }
    }

    /// Where the history parted from what a follower that knew of the
    /// first `known` rewinds read: the lowest point of those after them,
    /// since each gave the positions above its own point again. One that
    /// missed more than are kept goes back to the lowest of all.
    fn parted_since(&self, known: u64) -> Option<i64> {
        let kept = self
            .recent
            .iter()
            .filter(|(count, _)| *count > known)
            .map(|(_, parted)| *parted)
            .min();
        let missed_dropped = known < self.count - self.recent.len() as u64;
        match (kept, self.dropped.filter(|_| missed_dropped)) {
            (Some(kept), Some(dropped)) => Some(kept.min(dropped)),
            (kept, dropped) => kept.or(dropped),
        }
    }
}

/// How many of the items it read last the tail remembers by event id, to
/// find where a rewound history parted from them.
const REMEMBERED: usize = 1024;

/// The items the tail read last, by position and event id.
#[derive(Default)]
struct Remembered(std::collections::VecDeque<(i64, String)>);

impl Remembered {
    fn push(&mut self, items: &[Item]) {
        self.extend(
            items
                .iter()
                .map(|item| (item.position, item.event_id.clone())),
        );
    }

    fn extend(&mut self, items: impl IntoIterator<Item = (i64, String)>) {
        self.0.extend(items);
        while self.0.len() > REMEMBERED {
            self.0.pop_front();
        }
    }

    /// Whether `stored`, found at a position read before, is not the item
    /// read there: a history rewound and given that position again.
    fn replaced(&self, stored: &Item) -> bool {
        self.0
            .iter()
            .rev()
            .find(|(position, _)| *position == stored.position)
            .is_some_and(|(_, read)| *read != stored.event_id)
    }

    /// The last position at or below `at` whose item is still the one
    /// read there: where a rewound history parted from what was read.
    /// Below every remembered item when none is (a rewind deeper than
    /// [`REMEMBERED`] items, or into what compaction took).
    async fn parted(&mut self, store: &dyn OutboxStore, at: i64) -> Result<i64, StoreError> {
        let Some(stored) = self.stored(store, at).await? else {
            return Ok(at);
        };
        let parted = self.parted_from(&stored, at);
        self.0.retain(|(position, _)| *position <= parted);
        Ok(parted)
    }

    /// What the store holds now at the remembered positions up to `at`;
    /// `None` when nothing is remembered.
    async fn stored(
        &self,
        store: &dyn OutboxStore,
        at: i64,
    ) -> Result<Option<std::collections::HashMap<i64, String>>, StoreError> {
        let Some(&(lowest, _)) = self.0.front() else {
            return Ok(None);
        };
        Ok(Some(
            store
                .event_ids_between(lowest, at)
                .await?
                .into_iter()
                .collect(),
        ))
    }

    /// Where a subscriber that was sent the remembered items, up to `at`,
    /// parts from the history the store holds now, if it does: another
    /// item stands at one of their positions. An item gone (compacted) is
    /// no sign.
    async fn rewound_under(
        &self,
        store: &dyn OutboxStore,
        at: i64,
    ) -> Result<Option<i64>, StoreError> {
        let Some(stored) = self.stored(store, at).await? else {
            return Ok(None);
        };
        let replaced = self
            .0
            .iter()
            .any(|(position, read)| stored.get(position).is_some_and(|stored| stored != read));
        Ok(replaced.then(|| self.parted_from(&stored, at)))
    }

    fn parted_from(&self, stored: &std::collections::HashMap<i64, String>, at: i64) -> i64 {
        let Some(&(lowest, _)) = self.0.front() else {
            return at;
        };
        self.0
            .iter()
            .rev()
            .filter(|(position, _)| *position <= at)
            .find(|(position, read)| stored.get(position) == Some(read))
            .map_or(lowest - 1, |(position, _)| *position)
            .min(at)
    }
}

/// How many of the items a subscriber was sent last are compared with
/// the store when it subscribes again.
pub const SEEN: usize = 64;

/// How many batches a follower may fall behind the tail before it reads
/// the store itself again.
const TAIL_BATCHES: usize = 64;

/// How often, at most, the tail checks that the head has not fallen below
/// what it read, when a read finds nothing.
const REWIND_CHECK: Duration = Duration::from_secs(1);

fn bump(signal: &watch::Sender<u64>) {
    signal.send_modify(|n| *n = n.wrapping_add(1));
}

/// A change of `signal`; never, when there is none or its sender is gone.
async fn changed(signal: &mut Option<watch::Receiver<u64>>) {
    match signal {
        Some(receiver) => {
            if receiver.changed().await.is_err() {
                *signal = None;
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

/// Makes committed items readable and says so. On Postgres it positions
/// them (woken by this process's commits and other processes' `NOTIFY`,
/// polling as the fallback) and wakes local readers; on SQLite, a local
/// commit is the signal itself.
///
/// Every replica listens to the same commit notifications, so a round
/// woken by one that positions nothing still wakes local readers: another
/// replica's round positioned those items (this round waited for its lock,
/// or ran after it), and they are readable here now.
async fn make_readable(store: Arc<dyn OutboxStore>, readable: watch::Sender<u64>) {
    let mut commits = store.commits();
    if !store.sequenced_after_commit() {
        loop {
            tokio::select! {
                _ = readable.closed() => return,
                changed = commits.changed() => if changed.is_err() { return },
            }
            bump(&readable);
        }
    }
    let mut commits = Some(commits);
    let mut remote_commits = store.listen(muster_store::COMMITS_CHANNEL);
    let mut woken = true;
    loop {
        match store.sequence(MAX_SEQUENCE).await {
            Ok(0) => {
                if woken {
                    bump(&readable);
                }
            }
            Ok(n) => {
                bump(&readable);
                woken = false;
                // A full round may have left more; otherwise commits made
                // during the round have notified, and the select returns.
                if n as i64 == MAX_SEQUENCE {
                    continue;
                }
            }
            Err(error) => tracing::warn!(%error, "sequencing the outbox failed; retrying"),
        }
        woken = tokio::select! {
            _ = readable.closed() => return,
            _ = changed(&mut commits) => true,
            _ = changed(&mut remote_commits) => true,
            _ = tokio::time::sleep(POLL_INTERVAL) => false,
        };
    }
}

/// What a follower receives, in position order.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed {
    Item(Item),
    /// The items after the previous one sent (or after where the follower
    /// started) up to and including `through` were compacted before the
    /// follower read them. Positions are dense, so a jump is always one.
    ///
    /// A `through` below the previous position says the outbox's history
    /// was rewound under the follower (a store restored from a backup, or
    /// a Postgres failover that lost commits): what it read above
    /// `through` is gone, positions above it will be given again, and it
    /// goes on from `through`.
    Gap {
        through: i64,
    },
}

impl Followed {
    pub fn position(&self) -> i64 {
        match self {
            Followed::Item(item) => item.position,
            Followed::Gap { through } => *through,
        }
    }
}

/// What a follower sends into.
pub type FollowSink = mpsc::Sender<Result<Followed, StoreError>>;

/// Sends the items after `cursor`, moving it, each after word of what
/// compaction took before it; false when the receiver went away.
async fn send_after(
    cursor: &mut i64,
    items: impl Iterator<Item = &Item>,
    sink: &FollowSink,
) -> bool {
    for item in items {
        if item.position <= *cursor {
            continue;
        }
        if item.position > *cursor + 1 && !send_gap(cursor, item.position - 1, sink).await {
            return false;
        }
        *cursor = item.position;
        if sink.send(Ok(Followed::Item(item.clone()))).await.is_err() {
            return false;
        }
    }
    true
}

/// Says that what lies after `cursor` up to `through` is gone (or, with
/// `through` below it, that the history was rewound), moving the cursor
/// to `through`; false when the receiver went away.
async fn send_gap(cursor: &mut i64, through: i64, sink: &FollowSink) -> bool {
    if through < *cursor {
        tracing::warn!(
            read_through = *cursor,
            through,
            "a follower had read past where the outbox's history was rewound: it goes on from there"
        );
    } else {
        tracing::info!(
            after = *cursor,
            through,
            "items were compacted before a follower read them"
        );
    }
    *cursor = through;
    sink.send(Ok(Followed::Gap { through })).await.is_ok()
}

/// Reads every item as it becomes readable, from the head at start, and
/// publishes it to the followers; stops when the last [`Outbox`] is gone.
async fn read_tail(
    store: Arc<dyn OutboxStore>,
    readable: watch::Receiver<u64>,
    tail: std::sync::Weak<broadcast::Sender<Published>>,
    ready: watch::Sender<bool>,
    rewinds: watch::Sender<Rewinds>,
) {
    let mut cursor = loop {
        match store.head().await {
            Ok(head) => break head,
            Err(error) => tracing::warn!(%error, "reading the outbox head failed; retrying"),
        }
        if tail.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    // Followers wait for the tail's cursor only, not for what follows.
    ready.send_replace(true);
    // What stands up to the head as the tail starts, as though it had
    // read it: a rewind before the tail reads anything is then found, and
    // where it parted too.
    let mut remembered = Remembered::default();
    let from = cursor.saturating_sub(REMEMBERED as i64 - 1).max(1);
    match store.event_ids_between(from, cursor).await {
        Ok(ids) => remembered.extend(ids),
        Err(error) => tracing::warn!(%error, "reading the outbox's last event ids failed"),
    }
    let mut readable = Some(readable);
    let mut rewind_checked = tokio::time::Instant::now();
    // Goes back to where a rewound history parted from what was read, and
    // tells the followers; false when the tail is no longer wanted.
    let rewind = |cursor: &mut i64, parted: i64| {
        tracing::warn!(
            parted,
            read_through = *cursor,
            "the outbox's history was rewound (a restored store, or a failover that lost commits): reading again after where it parted from what was read"
        );
        *cursor = parted;
        let Some(tail) = tail.upgrade() else {
            return false;
        };
        rewinds.send_modify(|rewinds| rewinds.push(parted));
        let _ = tail.send(Published::Rewound);
        true
    };
    loop {
        if let Some(readable) = &mut readable {
            readable.borrow_and_update();
        }
        // The item at the cursor is read again (its event id, not its
        // payload) with what follows it, in the one statement: if another
        // holds its position now, the history was rewound and given
        // positions again, and the positions after the cursor are not all
        // that is new (the head alone would not tell: it may stand above
        // the cursor again already). An item gone from there (compacted)
        // is no sign.
        let read = store
            .read_all_from(cursor, MAX_READ + 1)
            .await
            .map(|mut page| {
                let mut replaced = false;
                if page
                    .items
                    .first()
                    .is_some_and(|item| item.position == cursor)
                {
                    replaced = remembered.replaced(&page.items.remove(0));
                }
                (page, replaced)
            });
        match read {
            Ok((_, true)) => match remembered.parted(&*store, cursor).await {
                Ok(parted) => {
                    if !rewind(&mut cursor, parted) {
                        return;
                    }
                    continue;
                }
                // Nothing published: the read is made again.
                Err(error) => {
                    tracing::warn!(%error, "outbox read failed; retrying");
                    if tail.strong_count() == 0 {
                        return;
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                    continue;
                }
            },
            Ok((outbox::Page { items, more }, false)) if !items.is_empty() => {
                // A short page was everything readable when the read
                // began; anything newer changes `readable` after it.
                cursor = items.last().map_or(cursor, |item| item.position);
                remembered.push(&items);
                let Some(tail) = tail.upgrade() else { return };
                // No follower is no error: followers catch up from the
                // store.
                let _ = tail.send(Published::Items(items.into()));
                if more {
                    continue;
                }
            }
            // Not after every empty read: commits without items wake the
            // tail too, and on SQLite every connection record is one.
            Ok(_) if rewind_checked.elapsed() >= REWIND_CHECK => {
                rewind_checked = tokio::time::Instant::now();
                match store.head().await {
                    // Items may have been given positions again up to the
                    // head already: where the history parted may lie below.
                    Ok(head) if head < cursor => match remembered.parted(&*store, head).await {
                        Ok(parted) => {
                            if !rewind(&mut cursor, parted) {
                                return;
                            }
                            continue;
                        }
                        Err(error) => tracing::warn!(%error, "outbox read failed; retrying"),
                    },
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "reading the outbox head failed"),
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "outbox read failed; retrying"),
        }
        if tail.strong_count() == 0 {
            return;
        }
        tokio::select! {
            _ = changed(&mut readable) => {}
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

impl Outbox {
    /// Starts making this store's items readable (the sequencer on
    /// Postgres) for as long as the returned reader or a clone lives.
    pub fn new(store: Arc<dyn OutboxStore>) -> Self {
        let (readable, receiver) = watch::channel(0);
        tokio::spawn(make_readable(store.clone(), readable));
        let tail = Arc::new(broadcast::channel(TAIL_BATCHES).0);
        let (ready, tail_ready) = watch::channel(false);
        let (rewound, rewinds) = watch::channel(Rewinds::default());
        tokio::spawn(read_tail(
            store.clone(),
            receiver,
            Arc::downgrade(&tail),
            ready,
            rewound,
        ));
        Outbox {
            store,
            tail,
            tail_ready,
            rewinds,
        }
    }

    /// Streams every item after `after` (or after the current head) into
    /// `sink`, oldest first, as items become readable, until the receiver
    /// goes away.
    ///
    /// A follower reads the store only to catch up; then it takes the
    /// tail's batches, so that N followers cost one read per wake-up, not
    /// N. It subscribes to the tail before it catches up: whatever the tail
    /// published before that was readable before it, so the catch-up reads
    /// it, and whatever comes later is in the subscription (items at or
    /// below the cursor are skipped). A follower that falls too far behind
    /// the tail catches up from the store again.
    pub async fn follow(&self, after: Option<i64>, sink: FollowSink) {
        self.follow_seen(after, Vec::new(), sink).await;
    }

    /// As [`Outbox::follow`], for a subscriber that was sent `seen`
    /// (positions and event ids, oldest first) up to `after`: when the
    /// outbox holds other items at their positions now, its history was
    /// rewound while no tail of this reader read it (the tail finds a
    /// rewind under it by what it read itself), and the follower is sent a
    /// gap at where the histories parted and goes on from there. The
    /// newest [`SEEN`] within [`REMEMBERED`] positions of `after` are
    /// compared.
    pub async fn follow_seen(
        &self,
        after: Option<i64>,
        mut seen: Vec<(i64, String)>,
        sink: FollowSink,
    ) {
        let mut ready = self.tail_ready.clone();
        if ready.wait_for(|ready| *ready).await.is_err() {
            return;
        }
        // Rewinds before the follower started are not its own: where it
        // starts is its subscriber's word.
        let mut rewinds = self.rewinds.clone();
        let mut rewinds_known = rewinds.borrow_and_update().count;
        let mut cursor = match after {
            Some(position) => position,
            None => match self.store.head().await {
                Ok(head) => head,
                Err(error) => {
                    let _ = sink.send(Err(error)).await;
                    return;
                }
            },
        };
        if after.is_some() {
            seen.retain(|(position, _)| {
                *position <= cursor && *position > cursor - REMEMBERED as i64
            });
            seen.sort_unstable_by_key(|(position, _)| *position);
            seen.dedup_by_key(|(position, _)| *position);
            let newest = seen.len().saturating_sub(SEEN);
            let mut remembered = Remembered::default();
            remembered.extend(seen.drain(newest..));
            let parted = loop {
                match remembered.rewound_under(&*self.store, cursor).await {
                    Ok(parted) => break parted,
                    Err(error) => {
                        tracing::warn!(%error, "outbox read failed; retrying");
                        tokio::select! {
                            _ = sink.closed() => return,
                            _ = tokio::time::sleep(POLL_INTERVAL) => {}
                        }
                    }
                }
            };
            if let Some(parted) = parted {
                tracing::warn!(
                    parted,
                    after = cursor,
                    "a subscriber was sent items the outbox no longer holds at their positions (a restored store, or a failover that lost commits): it goes on from where the histories parted"
                );
                if !send_gap(&mut cursor, parted, &sink).await {
                    return;
                }
            }
        }
        'catch_up: loop {
            let mut batches = self.tail.subscribe();
            loop {
                // The head before the items: a head above the cursor with
                // nothing after it was compacted, not committed meanwhile.
                let read = async {
                    let head = self.store.head().await?;
                    Ok::<_, StoreError>((head, self.store.read_all_after(cursor, MAX_READ).await?))
                };
                match read.await {
                    Ok((head, outbox::Page { items, more })) => {
                        // The head reads at or above every position read
                        // before it, unless the outbox's history was
                        // rewound under this follower: it would skip the
                        // items given its positions again.
                        if head < cursor {
                            if !send_gap(&mut cursor, head, &sink).await {
                                return;
                            }
                            continue;
                        }
                        if items.is_empty()
                            && head > cursor
                            && !send_gap(&mut cursor, head, &sink).await
                        {
                            return;
                        }
                        if !send_after(&mut cursor, items.iter(), &sink).await {
                            return;
                        }
                        if !more {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "outbox read failed; retrying");
                        tokio::select! {
                            _ = sink.closed() => return,
                            _ = tokio::time::sleep(POLL_INTERVAL) => {}
                        }
                    }
                }
            }
            loop {
                let batch = tokio::select! {
                    _ = sink.closed() => return,
                    batch = batches.recv() => batch,
                };
                match batch {
                    Ok(Published::Items(batch)) => {
                        if !send_after(&mut cursor, batch.iter(), &sink).await {
                            return;
                        }
                    }
                    // A follower that fell behind may have missed the
                    // word of a rewind, and its catch-up cannot tell one
                    // that was given positions again past it.
                    Ok(Published::Rewound) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        if rewinds.has_changed().unwrap_or(false) {
                            let parted = {
                                let rewinds = rewinds.borrow_and_update();
                                let parted = rewinds.parted_since(rewinds_known);
                                rewinds_known = rewinds.count;
                                parted
                            };
                            if let Some(parted) = parted
                                && cursor > parted
                                && !send_gap(&mut cursor, parted, &sink).await
                            {
                                return;
                            }
                        }
                        continue 'catch_up;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }

    /// Committed items of one tenant after `after`, at most `limit` (capped
    /// at [`MAX_READ`]; 0 means the cap).
    pub async fn read(
        &self,
        tenant_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Item>, StoreError> {
        if tenant_id.trim().is_empty() {
            return Err(StoreError::invalid("tenant_id", "required"));
        }
        let limit = if limit == 0 {
            MAX_READ
        } else {
            limit.min(MAX_READ)
        };
        self.store.read_after(tenant_id, after, limit).await
    }

    /// Where the item `event_id` of `tenant_id` stands, if the outbox still
    /// holds it.
    pub async fn locate(&self, tenant_id: &str, event_id: &str) -> Result<Option<i64>, StoreError> {
        if tenant_id.trim().is_empty() {
            return Err(StoreError::invalid("tenant_id", "required"));
        }
        if event_id.trim().is_empty() {
            return Err(StoreError::invalid("event_id", "required"));
        }
        self.store.position_of(tenant_id, event_id).await
    }

    pub async fn ack(&self, consumer_id: &str, position: i64) -> Result<(), StoreError> {
        self.store.ack(consumer_id, position).await
    }

    /// The last position given to a readable item.
    pub async fn head(&self) -> Result<i64, StoreError> {
        self.store.head().await
    }

    pub async fn progress(&self, consumer_id: &str) -> Result<Option<i64>, StoreError> {
        self.store.progress(consumer_id).await
    }

    /// Compacts under the `outbox.compaction` lease and reports depth,
    /// lag and age as metrics, every `every`, until `stop`.
    pub async fn maintain(
        self,
        directory: Arc<dyn DirectoryStore>,
        retention: Retention,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let holder = uuid::Uuid::new_v4().to_string();
        let lease_ms = (every.as_millis() as i64) * 3;
        // Records expire when their edge stopped heartbeating; but while
        // the store could not be reached no edge could, and dropped then,
        // live edges' records would go too, and every peer of every edge
        // be closed with 4004 at its next heartbeat.
        let mut reported = std::collections::HashSet::new();
        // So records expire only once the edges have had three heartbeats
        // through a store that answers this replica, and again so after
        // rounds apart by longer than records outlive a heartbeat.
        let heartbeat = Duration::from_secs(5);
        let ttl = Duration::from_millis(directory::DIRECTORY_TTL_MS as u64);
        let mut expiry = Tenure::new(3 * heartbeat, (ttl - heartbeat).max(2 * every));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => {
                    // Another replica compacts from its next round, not
                    // after this lease ran out.
                    let release = self.store.release_lease(COMPACTION_LEASE, &holder);
                    let _ = tokio::time::timeout(Duration::from_secs(1), release).await;
                    return;
                }
                _ = tokio::time::sleep(every) => {}
            }
            match self.store.lease(COMPACTION_LEASE, &holder, lease_ms).await {
                Ok(true) => {
                    match self.store.compact(&retention).await {
                        Ok(0) => {}
                        Ok(removed) => {
                            metrics::counter!("muster_outbox_compacted_total").increment(removed);
                            tracing::debug!(removed, "outbox compacted");
                        }
                        // Not the store's absence (the lease was just
                        // renewed): a statement that failed must not hold
                        // off expiry round after round.
                        Err(error) => tracing::warn!(%error, "outbox compaction failed"),
                    }
                    if expiry.held(muster_store::now_ms()) {
                        match directory.expire().await {
                            Ok(0) => {}
                            Ok(expired) => tracing::info!(
                                expired,
                                "connection records expired: their edge stopped heartbeating"
                            ),
                            Err(error) => tracing::warn!(%error, "directory expiry failed"),
                        }
                    }
                }
                Ok(false) => expiry.lost(),
                Err(error) => tracing::warn!(%error, "compaction lease unavailable"),
            }
            if let Ok((depth, consumers)) = self.store.depth().await {
                metrics::gauge!("muster_outbox_items").set(depth.items as f64);
                metrics::gauge!("muster_outbox_head").set(depth.head as f64);
                let age = depth
                    .oldest_unacked_ms
                    .map(|at| (muster_store::now_ms() - at).max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                metrics::gauge!("muster_outbox_oldest_unacked_seconds").set(age);
                let mut now_reported = std::collections::HashSet::with_capacity(consumers.len());
                for consumer in consumers {
                    metrics::gauge!("muster_outbox_consumer_lag", "consumer" => consumer.consumer_id.clone())
                        .set((depth.head - consumer.position).max(0) as f64);
                    now_reported.insert(consumer.consumer_id);
                }
                // A consumer whose progress was dropped (an edge gone for
                // ten minutes) would otherwise keep its last lag, and an
                // alert on it would fire for an edge that no longer exists.
                for gone in reported.difference(&now_reported) {
                    metrics::gauge!("muster_outbox_consumer_lag", "consumer" => gone.clone())
                        .set(0.0);
                }
                reported = now_reported;
            }
        }
    }
}

/// The lease under which one replica compacts the outbox.
pub const COMPACTION_LEASE: &str = "outbox.compaction";

/// The outbox's retention by default: a day, a million items; consumers
/// silent for ten minutes stop holding items back; every item stays at
/// least five minutes, for peers that reconnect and resume.
pub fn default_retention() -> Retention {
    Retention {
        ttl_ms: 24 * 3600 * 1000,
        max_items: 1_000_000,
        consumer_idle_ms: 10 * 60 * 1000,
        min_age_ms: 5 * 60 * 1000,
    }
}

/// Who may call what on the backplane; everything else is denied.
pub const RULES: &[Rule] = &[
    Rule::new("/muster.v1.Backplane/ReadOutbox", &[Edge, Ctl]),
    Rule::new("/muster.v1.Backplane/Subscribe", &[Edge]),
    Rule::new("/muster.v1.Backplane/Ack", &[Edge]),
    Rule::new("/muster.v1.Backplane/Locate", &[Edge, Ctl]),
    Rule::new("/muster.v1.Backplane/UpdateConnections", &[Edge]),
    Rule::new("/muster.v1.Backplane/HeartbeatEdge", &[Edge]),
    Rule::new("/muster.v1.Backplane/ForgetEdge", &[Edge]),
];

/// The gRPC face of [`Outbox`].
pub struct BackplaneService {
    outbox: Outbox,
    directory: Directory,
    /// Ends every subscription: a stream never ends by itself, and the
    /// server's shutdown waits for the requests in flight.
    shutdown: CancellationToken,
}

/// The backplane as the mesh serves it; its subscriptions end when
/// `shutdown` is cancelled.
pub fn spec(
    outbox: Outbox,
    directory: Arc<dyn DirectoryStore>,
    shutdown: CancellationToken,
) -> ServiceSpec {
    ServiceSpec {
        name: muster_tls::ServiceName::Backplane,
        grpc_service: "muster.v1.Backplane",
        routes: tonic::service::Routes::new(BackplaneServer::new(BackplaneService {
            outbox,
            directory: Directory::new(directory),
            shutdown,
        })),
        rules: RULES,
    }
}

/// A stream's word of where it stands (see `OutboxItem.mark`).
/// The most payload one `ReadOutbox` answer carries: half of what a gRPC
/// client decodes by default.
const READ_BYTES: usize = 2 * 1024 * 1024;
/// An item's ids, type, audience and target, roughly, beside its payload.
const ITEM_OVERHEAD_BYTES: usize = 256;

fn mark(position: i64, head: i64) -> pb::OutboxItem {
    pb::OutboxItem {
        position,
        mark: true,
        head,
        ..Default::default()
    }
}

fn to_pb(followed: Followed) -> pb::OutboxItem {
    let item = match followed {
        Followed::Item(item) => item,
        Followed::Gap { through } => {
            return pb::OutboxItem {
                position: through,
                gap: true,
                ..Default::default()
            };
        }
    };
    let target = item.target.map(|t| pb::OutboxTarget {
        kind: Some(match t {
            Target::Device(id) => pb::outbox_target::Kind::DeviceId(id),
            Target::Connection(id) => pb::outbox_target::Kind::ConnectionId(id),
            Target::Edge(id) => pb::outbox_target::Kind::EdgeId(id),
        }),
    });
    pb::OutboxItem {
        position: item.position,
        tenant_id: item.tenant_id,
        event_id: item.event_id,
        r#type: item.kind,
        payload_json: item.payload.to_string(),
        target,
        audience: Some(pb::Audience {
            roles: item.audience_roles,
            scopes: item.audience_scopes,
        }),
        occurred_at_ms: item.occurred_at_ms,
        ..Default::default()
    }
}

/// At most this many items that wait together in a subscription share
/// one directory lookup.
const FORWARD_BATCH: usize = 256;

/// Which of `items` go to `consumer`: a directed item only if that edge
/// holds its target (a subscriber without a name gets everything). If the
/// directory cannot be read, every item goes: the edge delivers only to
/// its own peers.
async fn addressed_to(
    directory: &dyn DirectoryStore,
    consumer: &str,
    items: &[Result<Followed, StoreError>],
) -> Vec<bool> {
    let mut keep = vec![true; items.len()];
    let directed: Vec<(usize, (&str, &Target))> = items
        .iter()
        .enumerate()
        .filter_map(|(n, item)| {
            let Ok(Followed::Item(item)) = item else {
                return None;
            };
            Some((n, (item.tenant_id.as_str(), item.target.as_ref()?)))
        })
        .collect();
    if consumer.is_empty() || directed.is_empty() {
        return keep;
    }
    let targets: Vec<(&str, &Target)> = directed.iter().map(|&(_, target)| target).collect();
    match directory.holding(consumer, &targets).await {
        Ok(held) => {
            for (&(n, _), held) in directed.iter().zip(held) {
                keep[n] = held;
            }
        }
        Err(error) => tracing::warn!(%error, "directory lookup failed; sending the items anyway"),
    }
    keep
}

#[tonic::async_trait]
impl Backplane for BackplaneService {
    type SubscribeStream = ReceiverStream<Result<pb::OutboxItem, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = request.into_inner();
        let (items, mut rx) = mpsc::channel(256);
        let mut starts_with_gap = false;
        let after = if r.resume {
            if r.consumer_id.trim().is_empty() {
                return Err(Status::invalid_argument("resume needs a consumer_id"));
            }
            let progress = self
                .outbox
                .progress(&r.consumer_id)
                .await
                .map_err(|e| to_status(&e))?;
            match progress {
                Some(position) => Some(position),
                // A consumer with no progress kept (new, or silent for so
                // long that it was dropped) cannot know what came before
                // the head: it is told so, as of a gap, and starts there.
                None => {
                    let head = self.outbox.head().await.map_err(|e| to_status(&e))?;
                    let _ = items.send(Ok(Followed::Gap { through: head })).await;
                    starts_with_gap = true;
                    Some(head)
                }
            }
        } else {
            (!r.from_head).then_some(r.after_position)
        };
        // Where the stream starts, told to the subscriber first unless a
        // gap says it.
        let start_mark = match after {
            Some(position) if !starts_with_gap => {
                let head = self.outbox.head().await.map_err(|e| to_status(&e))?;
                Some(mark(position, head))
            }
            _ => None,
        };
        let (out, stream) = mpsc::channel(256);
        if let Some(mark) = start_mark {
            let _ = out.send(Ok(mark)).await;
        }
        let outbox = self.outbox.clone();
        // Only what follows the subscriber's own position was sent to it.
        let seen = if r.resume || r.from_head {
            Vec::new()
        } else {
            r.seen
                .into_iter()
                .map(|item| (item.position, item.event_id))
                .collect()
        };
        tokio::spawn(async move { outbox.follow_seen(after, seen, items).await });
        let directory = self.directory.store().clone();
        let consumer = r.consumer_id;
        let shutdown = self.shutdown.clone();
        let stopping = out.clone();
        tokio::spawn(async move {
            let forward = async move {
                let mut batch = Vec::with_capacity(FORWARD_BATCH);
                loop {
                    // An edge that went away ends the subscription now, not
                    // at the next item for it (which may never come):
                    // dropping `rx` ends the follower too.
                    let received = tokio::select! {
                        received = rx.recv_many(&mut batch, FORWARD_BATCH) => received,
                        () = out.closed() => return,
                    };
                    if received == 0 {
                        return;
                    }
                    let keep = addressed_to(&*directory, &consumer, &batch).await;
                    // Items held back at the end of a batch are marked,
                    // so that the subscriber's progress passes them: an
                    // edge that only sees others' items still moves on.
                    let held_back = match (batch.last(), keep.last()) {
                        (Some(Ok(Followed::Item(last))), Some(false)) => Some(last.position),
                        _ => None,
                    };
                    for (item, keep) in batch.drain(..).zip(keep) {
                        if !keep {
                            continue;
                        }
                        let item = item.map(to_pb).map_err(|e| to_status(&e));
                        if out.send(item).await.is_err() {
                            return;
                        }
                    }
                    if let Some(position) = held_back
                        && out.send(Ok(mark(position, 0))).await.is_err()
                    {
                        return;
                    }
                }
            };
            // Also while a lookup or a send to an edge that stopped reading
            // waits. The edge subscribes again, to another replica or to
            // this one once it is back, from its progress.
            tokio::select! {
                () = forward => {}
                () = shutdown.cancelled() => {
                    let _ = stopping.try_send(Err(Status::unavailable("the backplane is stopping")));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let r = request.into_inner();
        self.outbox
            .ack(&r.consumer_id, r.position)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn update_connections(
        &self,
        request: Request<pb::UpdateConnectionsRequest>,
    ) -> Result<Response<pb::UpdateConnectionsResponse>, Status> {
        let changes = request.into_inner().changes;
        muster_proto::check_batch_len(changes.len())?;
        // Submitted together and in order, the changes share the group
        // commit's transactions; each still succeeds or fails alone.
        let outcomes = futures::future::join_all(changes.into_iter().map(|change| async {
            let applied = match change.change {
                Some(pb::connection_change::Change::Register(r)) => {
                    let registration = Registration {
                        connection_id: r.connection_id,
                        tenant_id: r.tenant_id,
                        device_id: r.device_id,
                        edge_id: r.edge_id,
                        role: r.role,
                    };
                    self.directory.register(registration).await.map(|()| true)
                }
                Some(pb::connection_change::Change::Unregister(u)) => {
                    self.directory.unregister(u.edge_id, u.connection_id).await
                }
                None => {
                    return pb::ItemOutcome::of(Err(Status::invalid_argument(
                        "change is required",
                    )));
                }
            };
            pb::ItemOutcome::of(applied.map_err(|e| to_status(&e)))
        }))
        .await;
        Ok(Response::new(pb::UpdateConnectionsResponse { outcomes }))
    }

    async fn heartbeat_edge(
        &self,
        request: Request<pb::HeartbeatEdgeRequest>,
    ) -> Result<Response<pb::HeartbeatEdgeResponse>, Status> {
        let connection_ids = self
            .directory
            .store()
            .heartbeat(&request.into_inner().edge_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::HeartbeatEdgeResponse { connection_ids }))
    }

    async fn forget_edge(
        &self,
        request: Request<pb::ForgetEdgeRequest>,
    ) -> Result<Response<pb::ForgetEdgeResponse>, Status> {
        let removed = self
            .directory
            .store()
            .forget_edge(&request.into_inner().edge_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ForgetEdgeResponse { removed }))
    }

    async fn locate(
        &self,
        request: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let r = request.into_inner();
        let position = self
            .outbox
            .locate(&r.tenant_id, &r.event_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::LocateResponse {
            found: position.is_some(),
            position: position.unwrap_or_default(),
        }))
    }

    async fn read_outbox(
        &self,
        request: Request<pb::ReadOutboxRequest>,
    ) -> Result<Response<pb::ReadOutboxResponse>, Status> {
        let r = request.into_inner();
        let items = self
            .outbox
            .read(&r.tenant_id, r.after_position, r.limit)
            .await
            .map_err(|e| to_status(&e))?;
        // A page stops at READ_BYTES (and has at least one item): a page of
        // large payloads would pass the 4 MiB a gRPC client decodes, and a
        // reader that pages on from its last item gets the rest next.
        let mut bytes = 0;
        let items = items
            .into_iter()
            .map(Followed::Item)
            .map(to_pb)
            .take_while(|item| {
                let first = bytes == 0;
                bytes += item.payload_json.len() + ITEM_OVERHEAD_BYTES;
                first || bytes <= READ_BYTES
            })
            .collect();
        Ok(Response::new(pb::ReadOutboxResponse { items }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_that_missed_several_rewinds_goes_back_to_the_lowest_point() {
        let mut rewinds = Rewinds::default();
        assert_eq!(rewinds.parted_since(0), None);
        rewinds.push(50);
        rewinds.push(80);
        // It knew of neither: the first gave the positions above 50 again.
        assert_eq!(rewinds.parted_since(0), Some(50));
        assert_eq!(rewinds.parted_since(1), Some(80));
        assert_eq!(rewinds.parted_since(2), None);
        for n in 0..REWINDS_KEPT as i64 {
            rewinds.push(100 + n);
        }
        // Past what is kept: the lowest of all.
        assert_eq!(rewinds.parted_since(0), Some(50));
        assert_eq!(rewinds.parted_since(2), Some(100));
        assert_eq!(rewinds.count, 2 + REWINDS_KEPT as u64);
    }
}
