//! In-process notifications: waiters (a CLI waiting on a run, a follower of live output)
//! subscribe and re-read the store when something they care about changed. A waiter that
//! falls behind treats that as "something changed", so no change is ever missed.

use domain::{ExecutionId, ExecutionState, RunId};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// An execution's state changed.
    Execution {
        run_id: RunId,
        execution_id: ExecutionId,
        state: ExecutionState,
        exit_code: Option<i32>,
    },
    /// More output of an execution was stored.
    Output { execution_id: ExecutionId },
    /// The last execution of a run ended.
    RunDone { run_id: RunId },
}

/// Events kept for slow subscribers. A fan-out to 10,000 machines makes about 30,000 in a
/// burst; a subscriber that falls further behind re-reads the store instead.
const CAPACITY: usize = 16 * 1024;

pub(crate) struct Events {
    sender: broadcast::Sender<Event>,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }

    pub(crate) fn publish(&self, event: Event) {
        // No subscriber is fine: nobody is waiting.
        let _ = self.sender.send(event);
    }

    pub(crate) fn subscribe(&self) -> Subscription {
        Subscription(self.sender.subscribe())
    }
}

pub(crate) struct Subscription(broadcast::Receiver<Event>);

impl Subscription {
    /// Waits for an event that `wanted` accepts. Returns early if events were missed.
    pub(crate) async fn wait_for(&mut self, wanted: impl Fn(&Event) -> bool) {
        loop {
            match self.next().await {
                Some(event) if wanted(&event) => return,
                Some(_) => continue,
                None => return,
            }
        }
    }

    /// The next event, or `None` if some were missed (the subscriber fell behind): then the
    /// caller must re-read what it follows from the store.
    pub(crate) async fn next(&mut self) -> Option<Event> {
        match self.0.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(_)) => None,
            // The sender lives as long as the server; if it is gone, nothing more will come.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}
