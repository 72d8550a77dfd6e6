//! Scripts downloaded from, and output uploaded to, pre-signed HTTP(S) URLs: S3 pre-signed
//! URLs, OCI Object Storage pre-authenticated requests and Azure SAS URLs all work this way.
//! Such a URL is a credential: only its redacted form (`redact`) ever appears in a message or
//! a log.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use crate::executor::ErrorCode;

/// Redirects followed when downloading a script (a pre-signed URL may point at another).
const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole download of a script, from connecting to its last byte.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The whole upload of one stream: up to the output cap (64 MiB by default) on a slow link.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Attempts at one upload; only connection errors and answers that say "try again" are
/// retried.
const UPLOAD_ATTEMPTS: u32 = 3;
const FIRST_UPLOAD_RETRY: Duration = Duration::from_millis(250);
/// The script size limit when the server sends none (an older server): the server's default.
const DEFAULT_MAX_SCRIPT_BYTES: u64 = 1 << 20;
/// Bytes read from an output file at a time while uploading it.
const UPLOAD_CHUNK_BYTES: usize = 64 * 1024;

/// Why a script could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DownloadFailure {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

/// The agent's HTTP client for scripts and output, built once.
pub(crate) fn client() -> anyhow::Result<reqwest::Client> {
    use anyhow::Context as _;
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .context("building the http client for script and output transfers")
}

/// Downloads a script: at most `max_bytes` (zero: the default limit), and when `sha256` is
/// given, only if its SHA-256 matches.
pub(crate) async fn download_script(
    client: &reqwest::Client,
    uri: &str,
    sha256: Option<&str>,
    max_bytes: u64,
) -> Result<Vec<u8>, DownloadFailure> {
    let max_bytes = if max_bytes == 0 {
        DEFAULT_MAX_SCRIPT_BYTES
    } else {
        max_bytes
    };
    let failed = |reason: String| DownloadFailure {
        code: ErrorCode::ScriptDownloadFailed,
        message: format!("downloading the script from {}: {reason}", redact(uri)),
    };
    let url = parse_http_url(uri).map_err(failed)?;
    let script = fetch(client, url, max_bytes).await.map_err(failed)?;
    if let Some(expected) = sha256 {
        let actual = hex::encode(Sha256::digest(&script));
        let expected = expected.trim().to_ascii_lowercase();
        if actual != expected {
            return Err(DownloadFailure {
                code: ErrorCode::ScriptChecksumMismatch,
                message: format!(
                    "the script downloaded from {} has SHA-256 {actual}, but {expected} was \
                     expected; it was not run",
                    redact(uri)
                ),
            });
        }
    }
    Ok(script)
}

async fn fetch(
    client: &reqwest::Client,
    url: reqwest::Url,
    max_bytes: u64,
) -> Result<Vec<u8>, String> {
    let too_large = || format!("the script is larger than {max_bytes} bytes");
    let mut response = client
        .get(url)
        .timeout(DOWNLOAD_TIMEOUT)
        .send()
        .await
        .map_err(describe_error)?;
    let status = response.status();
    if !status.is_success() {
        return Err(describe_status(status));
    }
    if response
        .content_length()
        .is_some_and(|length| length > max_bytes)
    {
        return Err(too_large());
    }
    let mut script = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(describe_error)? {
        if (script.len() + chunk.len()) as u64 > max_bytes {
            return Err(too_large());
        }
        script.extend_from_slice(&chunk);
    }
    Ok(script)
}

/// Uploads the first `length` bytes of `path` with one HTTP PUT to a pre-signed URL, streamed
/// from the file. The error says why, without the URL.
pub(crate) async fn upload_file(
    client: &reqwest::Client,
    uri: &str,
    path: &Path,
    length: u64,
) -> Result<(), String> {
    let url = parse_http_url(uri)?;
    let mut retry_in = FIRST_UPLOAD_RETRY;
    let mut attempt = 1;
    loop {
        match put_once(client, url.clone(), path, length).await {
            Ok(()) => return Ok(()),
            Err(failure) if failure.retryable && attempt < UPLOAD_ATTEMPTS => {
                tracing::info!(reason = %failure.reason, attempt, "an output upload failed; retrying");
                tokio::time::sleep(retry_in).await;
                retry_in *= 2;
                attempt += 1;
            }
            Err(failure) => return Err(failure.reason),
        }
    }
}

struct PutFailure {
    reason: String,
    retryable: bool,
}

async fn put_once(
    client: &reqwest::Client,
    url: reqwest::Url,
    path: &Path,
    length: u64,
) -> Result<(), PutFailure> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|error| PutFailure {
            reason: format!("reading {}: {error}", path.display()),
            retryable: false,
        })?;
    let body = if length == 0 {
        reqwest::Body::from(Vec::new())
    } else {
        reqwest::Body::wrap_stream(file_chunks(file.take(length)))
    };
    // Azure refuses a Put Blob without its blob type and without a length (it does not take
    // chunked bodies); S3 and OCI ignore the header. No Content-Type is sent: a pre-signed URL
    // may have signed one, and none is safer than a wrong one.
    let sent = client
        .put(url)
        .timeout(UPLOAD_TIMEOUT)
        .header("x-ms-blob-type", "BlockBlob")
        .header(reqwest::header::CONTENT_LENGTH, length)
        .body(body)
        .send()
        .await;
    let response = sent.map_err(|error| PutFailure {
        retryable: !error.is_builder(),
        reason: describe_error(error),
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    Err(PutFailure {
        reason: describe_status(status),
        retryable: status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
    })
}

/// The bytes of `reader` as a stream of chunks, read as the request body is sent.
fn file_chunks(
    reader: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::try_unfold(reader, |mut reader| async move {
        let mut chunk = vec![0_u8; UPLOAD_CHUNK_BYTES];
        let read = reader.read(&mut chunk).await?;
        if read == 0 {
            return Ok(None);
        }
        chunk.truncate(read);
        Ok(Some((chunk, reader)))
    })
}

fn parse_http_url(uri: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(uri).map_err(|error| format!("not a valid URL ({error})"))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(format!(
            "`{other}` URLs are not supported, only http and https"
        )),
    }
}

/// `HTTP 403 Forbidden`.
fn describe_status(status: reqwest::StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// The error and its causes, without the URL reqwest puts in its message (it may hold a
/// signature).
fn describe_error(error: reqwest::Error) -> String {
    let timed_out = error.is_timeout();
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    // Bounded: a chain of causes is short, but a cycle must not hang the agent.
    for _ in 0..8 {
        let Some(cause) = source else { break };
        let cause_text = cause.to_string();
        if !message.contains(&cause_text) {
            message.push_str(": ");
            message.push_str(&cause_text);
        }
        source = cause.source();
    }
    if timed_out && !message.contains("timed out") {
        message.push_str(" (timed out)");
    }
    message
}

/// A URL as it may be shown: scheme, host, port and path, without user info, query string or
/// fragment (where S3 and Azure put the signature), and with an OCI pre-authenticated
/// request's token (`/p/<token>/`) hidden.
pub(crate) fn redact(uri: &str) -> String {
    let Ok(url) = reqwest::Url::parse(uri) else {
        return "an invalid URL".to_string();
    };
    let host = url.host_str().unwrap_or_default();
    let port = url
        .port()
        .map(|port| format!(":{port}"))
        .unwrap_or_default();
    let mut path = String::new();
    let mut after_p = false;
    for segment in url.path().split('/').skip(1) {
        path.push('/');
        if after_p {
            path.push_str("***");
            after_p = false;
        } else {
            path.push_str(segment);
            after_p = segment == "p";
        }
    }
    format!("{}://{host}{port}{path}", url.scheme())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_keep_no_secret() {
        let check = |uri: &str, expected: &str| assert_eq!(redact(uri), expected, "{uri}");
        check(
            "https://account.blob.core.windows.net/c/out.txt?sv=2022&sig=SECRET",
            "https://account.blob.core.windows.net/c/out.txt",
        );
        check(
            "https://bucket.s3.amazonaws.com/key?X-Amz-Signature=SECRET#frag",
            "https://bucket.s3.amazonaws.com/key",
        );
        check(
            "https://objectstorage.us-ashburn-1.oraclecloud.com/p/SECRET/n/ns/b/bucket/o/script.sh",
            "https://objectstorage.us-ashburn-1.oraclecloud.com/p/***/n/ns/b/bucket/o/script.sh",
        );
        check(
            "http://user:SECRET@127.0.0.1:8080/a/b",
            "http://127.0.0.1:8080/a/b",
        );
        check("not a url SECRET", "an invalid URL");
    }

    #[test]
    fn only_http_urls_are_fetched() {
        assert_eq!(
            parse_http_url("file:///etc/passwd").err().as_deref(),
            Some("`file` URLs are not supported, only http and https")
        );
        assert!(parse_http_url("https://example.com/x").is_ok());
    }

    #[test]
    fn statuses_read_as_people_say_them() {
        assert_eq!(
            describe_status(reqwest::StatusCode::FORBIDDEN),
            "HTTP 403 Forbidden"
        );
        assert_eq!(
            describe_status(reqwest::StatusCode::from_u16(599).expect("valid")),
            "HTTP 599"
        );
    }
}
