//! A typed client of the fleetrun REST API, used by the CLI, the tests and the benchmarks.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use proto::api::{
    CreateRun, ErrorBody, ErrorDetail, Execution, ExecutionEvent, Machine, MachineList, Run,
    RunList,
};
use proto::run_command::{RunCommand, RunCommandList};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{}", api_message(.detail))]
    Api {
        status: StatusCode,
        detail: ErrorDetail,
    },
    #[error("cannot reach the fleetrun server at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("unexpected answer from the server ({status}): {body}")]
    Unexpected { status: StatusCode, body: String },
    #[error("{0}")]
    Config(String),
}

fn api_message(detail: &ErrorDetail) -> String {
    match &detail.field {
        Some(field) => format!("{} (field `{field}`, {})", detail.message, detail.code),
        None => format!("{} ({})", detail.message, detail.code),
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(url: &str, token: &str) -> Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Config(format!(
                "server URL `{url}` must start with http:// or https://"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|error| ClientError::Config(format!("building the HTTP client: {error}")))?;
        Ok(Self {
            http,
            base,
            token: token.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    async fn send(&self, request: RequestBuilder) -> Result<reqwest::Response> {
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&body) {
            Ok(error) => Err(ClientError::Api {
                status,
                detail: error.error,
            }),
            Err(_) => Err(ClientError::Unexpected { status, body }),
        }
    }

    async fn json<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T> {
        let response = self.send(request).await?;
        Ok(self.decode(response).await?.1)
    }

    /// A successful answer's status and JSON body.
    async fn decode<T: DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<(StatusCode, T)> {
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let value = serde_json::from_slice(&body).map_err(|error| ClientError::Unexpected {
            status,
            body: format!("{error}: {}", String::from_utf8_lossy(&body)),
        })?;
        Ok((status, value))
    }

    pub async fn machines(&self) -> Result<Vec<Machine>> {
        let list: MachineList = self.json(self.request(Method::GET, "/v1/machines")).await?;
        Ok(list.machines)
    }

    pub async fn machine(&self, name_or_id: &str) -> Result<Machine> {
        self.json(self.request(Method::GET, &format!("/v1/machines/{}", encode(name_or_id))))
            .await
    }

    pub async fn delete_machine(&self, name_or_id: &str) -> Result<()> {
        self.send(self.request(
            Method::DELETE,
            &format!("/v1/machines/{}", encode(name_or_id)),
        ))
        .await?;
        Ok(())
    }

    pub async fn create_run(&self, run: &CreateRun) -> Result<Run> {
        self.json(self.request(Method::POST, "/v1/runs").json(run))
            .await
    }

    pub async fn runs(&self, limit: u32, before: Option<&str>) -> Result<RunList> {
        let mut request = self
            .request(Method::GET, "/v1/runs")
            .query(&[("limit", limit.to_string())]);
        if let Some(before) = before {
            request = request.query(&[("before", before)]);
        }
        self.json(request).await
    }

    /// A run with its executions. With `wait`, the server holds the answer until the run is
    /// done or `wait` has passed.
    pub async fn run(&self, id: &str, wait: Option<Duration>) -> Result<Run> {
        let mut request = self.request(Method::GET, &format!("/v1/runs/{}", encode(id)));
        if let Some(wait) = wait {
            request = request.query(&[("wait", format!("{}ms", wait.as_millis()))]);
        }
        self.json(request).await
    }

    /// Waits until the run is done, however long that takes.
    pub async fn wait_run(&self, id: &str) -> Result<Run> {
        loop {
            let run = self.run(id, Some(Duration::from_secs(60))).await?;
            if matches!(run.status.as_str(), "succeeded" | "failed" | "canceled") {
                return Ok(run);
            }
        }
    }

    pub async fn cancel_run(&self, id: &str) -> Result<Run> {
        self.json(self.request(Method::POST, &format!("/v1/runs/{}/cancel", encode(id))))
            .await
    }

    pub async fn execution(&self, id: &str) -> Result<Execution> {
        self.json(self.request(Method::GET, &format!("/v1/executions/{}", encode(id))))
            .await
    }

    /// The bytes of one stream (`stdout` or `stderr`) of an execution from `offset`; with
    /// `follow`, the stream stays open until the execution ends.
    pub async fn output(
        &self,
        execution: &str,
        stream: &str,
        offset: u64,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        let request = self
            .request(
                Method::GET,
                &format!(
                    "/v1/executions/{}/output/{}",
                    encode(execution),
                    encode(stream)
                ),
            )
            .query(&[
                ("offset", offset.to_string()),
                ("follow", follow.to_string()),
            ]);
        let response = self.send(request).await?;
        let url = self.base.clone();
        Ok(response.bytes_stream().map(move |chunk| {
            chunk.map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })
        }))
    }

    /// The whole of one stream, collected.
    pub async fn output_bytes(&self, execution: &str, stream: &str) -> Result<Vec<u8>> {
        let mut chunks = Box::pin(self.output(execution, stream, 0, false).await?);
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        Ok(bytes)
    }

    fn run_command_path(machine: &str, name: &str) -> String {
        format!(
            "/v1/machines/{}/run-commands/{}",
            encode(machine),
            encode(name)
        )
    }

    /// Creates or replaces a named run command and runs it (`PUT`), or changes some of its
    /// properties and runs it again (`PATCH`, with `replace` false). `body` is Azure-shaped
    /// JSON. `wait` bounds how long the server waits for a script that is not asynchronous.
    /// Answers the HTTP status too: 202 means the script was still running.
    pub async fn put_run_command(
        &self,
        machine: &str,
        name: &str,
        body: &serde_json::Value,
        replace: bool,
        wait: Option<Duration>,
    ) -> Result<(StatusCode, RunCommand)> {
        let method = if replace { Method::PUT } else { Method::PATCH };
        let mut request = self
            .request(method, &Self::run_command_path(machine, name))
            .json(body);
        if let Some(wait) = wait {
            request = request.query(&[("wait", format!("{}ms", wait.as_millis()))]);
        }
        let response = self.send(request).await?;
        self.decode(response).await
    }

    pub async fn run_command(&self, machine: &str, name: &str) -> Result<RunCommand> {
        self.json(self.request(Method::GET, &Self::run_command_path(machine, name)))
            .await
    }

    pub async fn run_commands(&self, machine: &str) -> Result<Vec<RunCommand>> {
        let path = format!("/v1/machines/{}/run-commands", encode(machine));
        let list: RunCommandList = self.json(self.request(Method::GET, &path)).await?;
        Ok(list.value)
    }

    /// Stops the run command if it runs, and removes it.
    pub async fn delete_run_command(&self, machine: &str, name: &str) -> Result<()> {
        let path = Self::run_command_path(machine, name);
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// A GET of any path, answered as raw JSON: for tools and tests.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        self.json(self.request(Method::GET, path)).await
    }
}

/// Percent-encodes one path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// One server-sent event of `GET /v1/runs/{run}/events`.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// The run and its counts: first, and again whenever the stream had to catch up.
    Run(Run),
    Execution(ExecutionEvent),
    /// The run is over; nothing follows.
    Done(Run),
}

impl Client {
    /// Follows a run's state changes until it is over.
    pub async fn run_events(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<RunEvent>> + use<>> {
        let response = self
            .send(self.request(Method::GET, &format!("/v1/runs/{}/events", encode(id))))
            .await?;
        let url = self.base.clone();
        let state = (Box::pin(response.bytes_stream()), SseBuffer::default(), url);
        Ok(futures_util::stream::unfold(
            state,
            |(mut body, mut buffer, url)| async move {
                loop {
                    if let Some(event) = buffer.next_event() {
                        return Some((event, (body, buffer, url)));
                    }
                    match body.next().await {
                        Some(Ok(bytes)) => buffer.text.push_str(&String::from_utf8_lossy(&bytes)),
                        Some(Err(source)) => {
                            let error = ClientError::Unreachable {
                                url: url.clone(),
                                source,
                            };
                            return Some((Err(error), (body, buffer, url)));
                        }
                        None => return None,
                    }
                }
            },
        ))
    }
}

/// Splits a `text/event-stream` into events.
#[derive(Default)]
struct SseBuffer {
    text: String,
}

impl SseBuffer {
    fn next_event(&mut self) -> Option<Result<RunEvent>> {
        loop {
            let end = self.text.find("\n\n")?;
            let block: String = self.text.drain(..end + 2).collect();
            let mut name = "message";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim();
                } else if let Some(value) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            let parsed = match name {
                "run" => serde_json::from_str(&data).map(RunEvent::Run),
                "execution" => serde_json::from_str(&data).map(RunEvent::Execution),
                "done" => serde_json::from_str(&data).map(RunEvent::Done),
                // Keep-alive comments and events this client does not know.
                _ => continue,
            };
            return Some(parsed.map_err(|error| ClientError::Unexpected {
                status: StatusCode::OK,
                body: format!("event `{name}`: {error}"),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_server_sent_events() {
        let mut buffer = SseBuffer {
            text: ": keep-alive\n\nevent: execution\ndata: {\"id\":\"e\",\"run_id\":\"r\",\"state\":\"running\",\"previous_state\":\"pending\",\"exit_code\":null}\n\nevent: exec".to_string(),
        };
        match buffer.next_event() {
            Some(Ok(RunEvent::Execution(event))) => assert_eq!(event.state, "running"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            buffer.next_event().is_none(),
            "an incomplete event waits for more text"
        );
        assert_eq!(buffer.text, "event: exec");
    }
}
