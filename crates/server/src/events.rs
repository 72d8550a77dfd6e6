//! In-process notifications: waiters (a CLI waiting on a run, a follower of live output)
//! subscribe and re-read the store when something they care about changed. A waiter that
//! falls behind treats that as "something changed", so no change is ever missed.

use domain::{ExecutionId, RunId};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// An execution's state changed.
    Execution {
        run_id: RunId,
        execution_id: ExecutionId,
    },
    /// More output of an execution was stored.
    Output { execution_id: ExecutionId },
}

pub(crate) struct Events {
    sender: broadcast::Sender<Event>,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            sender: broadcast::channel(4096).0,
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
            match self.0.recv().await {
                Ok(event) if wanted(&event) => return,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
