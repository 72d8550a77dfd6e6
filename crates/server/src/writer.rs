//! Group commit: every execution state change goes through one task that applies whatever has
//! queued up in a single transaction. A fan-out to N machines costs O(N / batch) transactions,
//! not one per message, and the agents' reports wait only for the batch they are in.

use domain::ExecutionId;
use store::{ExecutionRecord, ExecutionUpdate};
use tokio::sync::{mpsc, oneshot};

use crate::{AppState, dispatch, now_millis};

/// Updates applied in one transaction at most.
const MAX_BATCH: usize = 2048;
/// Requests queued before callers wait.
const QUEUE: usize = 4096;

struct Request {
    updates: Vec<ExecutionUpdate>,
    /// The executions among `updates` that changed, or `None` if the batch failed.
    reply: oneshot::Sender<Option<Vec<ExecutionRecord>>>,
}

pub(crate) struct Writer {
    sender: mpsc::Sender<Request>,
}

/// The batch could not be written; the caller should drop what it was doing (an agent
/// connection is closed, and the agent resends after reconnecting).
#[derive(Debug, thiserror::Error)]
#[error("the store could not record execution updates (see the server log)")]
pub(crate) struct WriteFailed;

impl Writer {
    pub(crate) fn start(state: &AppState, receiver: Receiver) {
        tokio::spawn(run(state.clone(), receiver.0));
    }

    pub(crate) fn new() -> (Self, Receiver) {
        let (sender, receiver) = mpsc::channel(QUEUE);
        (Self { sender }, Receiver(receiver))
    }

    /// Applies `updates` with whatever else is queued, and returns those of them that changed.
    pub(crate) async fn apply(
        &self,
        updates: Vec<ExecutionUpdate>,
    ) -> Result<Vec<ExecutionRecord>, WriteFailed> {
        let answer = self.submit(updates).await?;
        answer.await.ok().flatten().ok_or(WriteFailed)
    }

    /// Queues `updates` without waiting for them to be written. Requests are applied in the
    /// order they were queued.
    pub(crate) async fn submit(
        &self,
        updates: Vec<ExecutionUpdate>,
    ) -> Result<oneshot::Receiver<Option<Vec<ExecutionRecord>>>, WriteFailed> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request { updates, reply })
            .await
            .map_err(|_| WriteFailed)?;
        Ok(answer)
    }
}

pub(crate) struct Receiver(mpsc::Receiver<Request>);

async fn run(state: AppState, mut receiver: mpsc::Receiver<Request>) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let mut count = batch[0].updates.len();
        while count < MAX_BATCH {
            match receiver.try_recv() {
                Ok(request) => {
                    count += request.updates.len();
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        let updates: Vec<ExecutionUpdate> = batch
            .iter()
            .flat_map(|request| request.updates.iter().cloned())
            .collect();
        match state.store.apply(&updates, now_millis()).await {
            Ok(outcome) => {
                let changed: std::collections::HashMap<ExecutionId, ExecutionRecord> = outcome
                    .changed
                    .iter()
                    .map(|execution| (execution.id, execution.clone()))
                    .collect();
                for request in batch {
                    let mine = request
                        .updates
                        .iter()
                        .filter_map(|update| changed.get(&update.id).cloned())
                        .collect();
                    let _ = request.reply.send(Some(mine));
                }
                dispatch::settled(&state, outcome);
            }
            Err(error) => {
                tracing::error!(%error, updates = updates.len(), "recording execution updates");
                for request in batch {
                    let _ = request.reply.send(None);
                }
            }
        }
    }
}
