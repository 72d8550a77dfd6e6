//! Execution output on the local disk: one append-only file per execution and stream.
//!
//! The file's length is the truth of how much output the server has: bytes that `write`
//! returned on survive a kill -9 of the server (they are in the page cache), so after a
//! restart the server tells the agent to resend from the file's length, and nothing is lost or
//! written twice.

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};

use domain::ExecutionId;
use tokio::fs;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

pub struct LocalBlobs {
    root: PathBuf,
}

impl LocalBlobs {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    fn path(&self, execution: ExecutionId, stream: &str) -> PathBuf {
        // 256 directories keep each small when there are millions of executions, and an
        // execution costs files, not a directory of its own.
        let id = execution.to_string();
        self.root
            .join(&id[id.len() - 2..])
            .join(format!("{id}.{stream}"))
    }

    /// How many bytes of the stream are stored.
    pub async fn len(&self, execution: ExecutionId, stream: &str) -> io::Result<u64> {
        match fs::metadata(self.path(execution, stream)).await {
            Ok(metadata) => Ok(metadata.len()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(error) => Err(error),
        }
    }

    /// Appends `data` at the end of the stream and returns the new length.
    pub async fn append(
        &self,
        execution: ExecutionId,
        stream: &str,
        data: &[u8],
    ) -> io::Result<u64> {
        // Plain blocking calls, on purpose: an append of at most one 64 KiB chunk to the page
        // cache takes microseconds, while handing each of open, write and stat to the blocking
        // thread pool cost more than the work and grew that pool to a hundred threads in a
        // 10,000-machine fan-out.
        use std::io::Write;
        let path = self.path(execution, stream);
        let open = || {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
        };
        let mut file = match open() {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                open()?
            }
            Err(error) => return Err(error),
        };
        file.write_all(data)?;
        Ok(file.metadata()?.len())
    }

    /// Reads up to `max` bytes from `offset`; empty at or past the end.
    pub async fn read(
        &self,
        execution: ExecutionId,
        stream: &str,
        offset: u64,
        max: usize,
    ) -> io::Result<Vec<u8>> {
        let mut file = match fs::File::open(self.path(execution, stream)).await {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        file.seek(SeekFrom::Start(offset)).await?;
        let mut buffer = Vec::with_capacity(max.min(1 << 20));
        file.take(max as u64).read_to_end(&mut buffer).await?;
        Ok(buffer)
    }

    /// The last `max` bytes of the stream.
    pub async fn tail(
        &self,
        execution: ExecutionId,
        stream: &str,
        max: usize,
    ) -> io::Result<Vec<u8>> {
        let len = self.len(execution, stream).await?;
        self.read(execution, stream, len.saturating_sub(max as u64), max)
            .await
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_reads_and_tails_bytes_exactly() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let blobs = LocalBlobs::new(dir.path())?;
        let id = ExecutionId::new();
        assert_eq!(blobs.len(id, "stdout").await?, 0);
        assert_eq!(blobs.read(id, "stdout", 0, 10).await?, b"");
        assert_eq!(blobs.append(id, "stdout", b"hello \xff").await?, 7);
        assert_eq!(blobs.append(id, "stdout", b"\x00world").await?, 13);
        assert_eq!(blobs.read(id, "stdout", 6, 100).await?, b"\xff\x00world");
        assert_eq!(blobs.tail(id, "stdout", 5).await?, b"world");
        assert_eq!(blobs.len(id, "stderr").await?, 0);
        Ok(())
    }
}
