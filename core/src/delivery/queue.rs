//! An exporter's sending queue: bounded in requests, points or bytes (`sending_queue.sizer`),
//! drained by the exporter's consumers in parallel.
//!
//! Room is reserved before a batch is queued and given back only when the batch has been
//! delivered or given up on, so the capacity bounds what is queued *and* in flight. A
//! reservation that is dropped without being used gives its room back, which lets a pipeline
//! reserve room in every exporter first and queue in all or none.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::disk_queue::Stored;
use crate::model::Batch;
use std::sync::Arc;

use serde::Deserialize;

use crate::telemetry::ComponentStats;

/// What an exporter's `sending_queue.queue_size` counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sizer {
    /// Batches, whatever their size.
    Requests,
    /// Data points.
    Items,
    /// What the queue holds in memory, what bounds it: a batch's estimated heap size, or
    /// the length of the request an exporter encoded it to when it was queued.
    #[default]
    Bytes,
}

/// What a queued batch is made of.
pub(crate) enum Payload {
    Memory(Arc<Batch>),
    /// The request the exporter built from the batch when it was queued.
    Encoded(crate::Bytes),
    /// Left on disk by a previous run; read when a consumer takes it.
    Disk(Stored),
    /// Taken by the consumer delivering it.
    Taken,
}

impl Payload {
    pub(crate) fn take(&mut self) -> Self {
        std::mem::replace(self, Self::Taken)
    }
}

/// A batch in an exporter's queue.
pub(crate) struct Item {
    pub payload: Payload,
    /// Its file in the persistent queue.
    pub seq: Option<u64>,
    pub queued_at_ms: u64,
    pub points: u64,
    /// What it holds in memory: the batch's heap size, estimated, or the request's length.
    pub bytes: u64,
    /// What it holds of the queue's capacity, in sizer units.
    pub size: u64,
}

/// How much of the queue's capacity a batch takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cost {
    pub points: u64,
    pub bytes: u64,
}

impl Cost {
    /// What `batch` takes: its points and its estimated heap size.
    pub fn of(batch: &Batch) -> Self {
        Self {
            points: batch.point_count() as u64,
            bytes: crate::model::approx_bytes(batch),
        }
    }

    pub fn size(self, sizer: Sizer) -> u64 {
        match sizer {
            Sizer::Requests => 1,
            Sizer::Items => self.points,
            Sizer::Bytes => self.bytes,
        }
    }
}

struct State {
    items: VecDeque<Item>,
    /// Batches an earlier run left on disk: taken in turn with fresh ones, so that fresh data
    /// keeps flowing while a backlog drains, and the backlog drains under steady fresh load.
    backlog: VecDeque<Item>,
    /// Whether the next pop prefers the backlog.
    backlog_turn: bool,
    /// Capacity held by queued items, items being sent and open reservations.
    used: u64,
    closed: bool,
}

pub(crate) struct SendQueue {
    state: Mutex<State>,
    capacity: u64,
    pub sizer: Sizer,
    /// Signalled when an item is queued or the queue closes.
    items: Notify,
    /// Signalled when capacity is given back.
    room: Notify,
}

/// Room taken in a queue; given back on drop unless [`Reservation::commit`] queues an item.
pub(crate) struct Reservation<'a> {
    queue: &'a SendQueue,
    size: u64,
}

impl SendQueue {
    /// Writes the queue's fill into its exporter's gauges.
    pub(crate) fn report(&self, stats: &ComponentStats) {
        use std::sync::atomic::Ordering;
        stats.queue_used.store(self.used(), Ordering::Relaxed);
        stats
            .queue_batches
            .store(self.len() as u64, Ordering::Relaxed);
    }

    pub fn new(capacity: u64, sizer: Sizer) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                backlog: VecDeque::new(),
                backlog_turn: false,
                used: 0,
                closed: false,
            }),
            capacity: capacity.max(1),
            sizer,
            items: Notify::new(),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: every update is one statement.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Capacity in use: queued, in flight and reserved.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Batches waiting to be taken by a consumer.
    pub fn len(&self) -> usize {
        let s = self.lock();
        s.items.len() + s.backlog.len()
    }

    /// No room left for anything: a push receiver can refuse before decoding a request.
    pub fn is_full(&self) -> bool {
        self.lock().used >= self.capacity
    }

    /// Takes `size` of the capacity if it is free. A batch larger than the whole capacity
    /// is let in when the queue is empty, so that it is not refused forever.
    pub fn try_reserve(&self, size: u64) -> Option<Reservation<'_>> {
        let mut s = self.lock();
        if s.closed {
            return None;
        }
        let fits = s.used.saturating_add(size) <= self.capacity || s.used == 0;
        if !fits {
            return None;
        }
        s.used = s.used.saturating_add(size);
        Some(Reservation { queue: self, size })
    }

    /// Waits until `size` fits; `None` once the queue is closed.
    pub async fn reserve(&self, size: u64) -> Option<Reservation<'_>> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(r) = self.try_reserve(size) {
                return Some(r);
            }
            if self.lock().closed {
                return None;
            }
            room.await;
        }
    }

    /// Queues an item that takes no capacity (a batch already on disk from a previous run).
    pub fn push_recovered(&self, item: Item) {
        self.lock().backlog.push_back(item);
        self.items.notify_one();
    }

    /// The next batch to send; `None` once the queue is closed and empty.
    pub async fn pop(&self) -> Option<Item> {
        loop {
            let ready = self.items.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            {
                let mut s = self.lock();
                let backlog_first = s.backlog_turn || s.items.is_empty();
                let next = if backlog_first {
                    s.backlog.pop_front().or_else(|| s.items.pop_front())
                } else {
                    s.items.pop_front()
                };
                if let Some(item) = next {
                    s.backlog_turn = !backlog_first;
                    let more = !s.items.is_empty() || !s.backlog.is_empty();
                    drop(s);
                    if more {
                        // Another consumer may be waiting for the rest.
                        self.items.notify_one();
                    }
                    return Some(item);
                }
                if s.closed {
                    return None;
                }
            }
            ready.await;
        }
    }

    /// Gives back the capacity of an item that was delivered or given up on.
    pub fn release(&self, size: u64) {
        {
            let mut s = self.lock();
            s.used = s.used.saturating_sub(size);
        }
        self.room.notify_waiters();
    }

    /// Closes the queue if nothing is queued or reserved, at once so that no reservation can
    /// slip in between; whether it did.
    pub fn close_if_idle(&self) -> bool {
        let mut s = self.lock();
        if s.used > 0 || !s.items.is_empty() || !s.backlog.is_empty() {
            return false;
        }
        s.closed = true;
        drop(s);
        self.items.notify_waiters();
        self.room.notify_waiters();
        true
    }

    /// No more batches will come: consumers end once the queue is empty.
    pub fn close(&self) {
        self.lock().closed = true;
        self.items.notify_waiters();
        self.room.notify_waiters();
    }
}

impl Reservation<'_> {
    /// Gives back what the item will not take after all (a batch queued as its smaller
    /// encoded request).
    pub fn shrink(&mut self, size: u64) {
        if size < self.size {
            self.queue.release(self.size - size);
            self.size = size;
        }
    }

    /// Queues `item` in the room reserved for it.
    pub fn commit(self, mut item: Item) {
        let queue = self.queue;
        item.size = self.size;
        std::mem::forget(self);
        queue.lock().items.push_back(item);
        queue.items.notify_one();
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.queue.release(self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(points: u64) -> Item {
        Item {
            payload: Payload::Memory(Arc::new(Batch::new())),
            seq: None,
            queued_at_ms: 0,
            points,
            bytes: 0,
            size: 0,
        }
    }

    #[tokio::test]
    async fn capacity_covers_queued_and_in_flight_items() {
        let q = SendQueue::new(10, Sizer::Items);
        q.try_reserve(6).unwrap().commit(item(6));
        assert!(q.try_reserve(5).is_none(), "6 + 5 is over 10");
        let r = q.try_reserve(4).unwrap();
        assert!(q.is_full());
        drop(r);
        assert_eq!(q.used(), 6, "an unused reservation gives its room back");

        let taken = q.pop().await.unwrap();
        assert_eq!(q.used(), 6, "in flight still counts");
        q.release(taken.size);
        assert_eq!(q.used(), 0);

        let big = q
            .try_reserve(25)
            .expect("an empty queue takes one oversized batch");
        assert!(q.try_reserve(1).is_none());
        drop(big);
    }

    #[tokio::test]
    async fn fresh_batches_take_turns_with_a_backlog_from_disk() {
        let q = SendQueue::new(100, Sizer::Items);
        for n in [1, 2, 3] {
            q.push_recovered(item(n));
        }
        for n in [10, 20, 30, 40] {
            q.try_reserve(n).unwrap().commit(item(n));
        }
        let mut order = Vec::new();
        while q.len() > 0 {
            order.push(q.pop().await.unwrap().points);
        }
        assert_eq!(order, [10, 1, 20, 2, 30, 3, 40]);
    }

    #[tokio::test]
    async fn reserve_waits_for_room_and_pop_ends_when_closed() {
        let q = Arc::new(SendQueue::new(2, Sizer::Requests));
        q.try_reserve(1).unwrap().commit(item(1));
        q.try_reserve(1).unwrap().commit(item(1));
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.reserve(1).await.map(|r| r.commit(item(1))).is_some() })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let first = q.pop().await.unwrap();
        q.release(first.size);
        assert!(waiter.await.unwrap(), "room given back wakes the waiter");
        q.close();
        assert!(q.pop().await.is_some() && q.pop().await.is_some());
        assert!(q.pop().await.is_none(), "closed and empty");
        assert!(q.try_reserve(1).is_none(), "a closed queue takes nothing");
    }
}
