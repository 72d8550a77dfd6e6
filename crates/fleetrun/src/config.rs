//! The server's configuration file (TOML). Every key is optional; flags override the file.
//!
//! ```toml
//! listen = "0.0.0.0:7070"
//! data_dir = "/var/lib/fleetrun"
//!
//! [limits]
//! max_script_bytes = "1MiB"
//! output_cap = "64MiB"
//! default_timeout = "1h"
//! default_delivery_timeout = "10m"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use domain::{Limits, parse_byte_size, parse_duration};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerFile {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) data_dir: Option<PathBuf>,
    #[serde(default)]
    pub(crate) limits: LimitsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsFile {
    pub(crate) max_script_bytes: Option<String>,
    pub(crate) output_cap: Option<String>,
    pub(crate) default_timeout: Option<String>,
    pub(crate) default_delivery_timeout: Option<String>,
}

impl ServerFile {
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in {}", path.display()))
    }
}

/// Limits from the file's values, then the flags' (which win).
pub(crate) fn limits(file: &LimitsFile, flags: &LimitsFile) -> anyhow::Result<Limits> {
    let mut limits = Limits::default();
    let pick = |flag: &Option<String>, file: &Option<String>| flag.clone().or_else(|| file.clone());
    if let Some(text) = pick(&flags.max_script_bytes, &file.max_script_bytes) {
        limits.max_script_bytes =
            parse_byte_size(&text).map_err(|e| anyhow::anyhow!("max_script_bytes: {e}"))?;
    }
    if let Some(text) = pick(&flags.output_cap, &file.output_cap) {
        limits.output_cap_bytes =
            parse_byte_size(&text).map_err(|e| anyhow::anyhow!("output_cap: {e}"))?;
    }
    if let Some(text) = pick(&flags.default_timeout, &file.default_timeout) {
        limits.default_timeout =
            parse_duration(&text).map_err(|e| anyhow::anyhow!("default_timeout: {e}"))?;
    }
    if let Some(text) = pick(
        &flags.default_delivery_timeout,
        &file.default_delivery_timeout,
    ) {
        limits.default_delivery_timeout =
            parse_duration(&text).map_err(|e| anyhow::anyhow!("default_delivery_timeout: {e}"))?;
    }
    if limits.max_script_bytes == 0 {
        bail!("max_script_bytes must be more than 0");
    }
    if limits.default_timeout.is_zero() || limits.default_delivery_timeout.is_zero() {
        bail!("default timeouts must be longer than zero");
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let error = toml::from_str::<ServerFile>("listen = \"127.0.0.1:1\"\nlisen = 3\n")
            .expect_err("unknown key");
        assert!(error.to_string().contains("lisen"), "{error}");
    }

    #[test]
    fn flags_override_the_file() -> anyhow::Result<()> {
        let file: ServerFile =
            toml::from_str("[limits]\nmax_script_bytes = \"2KiB\"\noutput_cap = \"1MiB\"\n")?;
        let flags = LimitsFile {
            output_cap: Some("5MiB".into()),
            ..LimitsFile::default()
        };
        let limits = limits(&file.limits, &flags)?;
        assert_eq!(limits.max_script_bytes, 2048);
        assert_eq!(limits.output_cap_bytes, 5 << 20);
        let bad = LimitsFile {
            default_timeout: Some("soon".into()),
            ..LimitsFile::default()
        };
        let error = super::limits(&LimitsFile::default(), &bad).expect_err("bad duration");
        assert!(error.to_string().contains("default_timeout"), "{error}");
        Ok(())
    }
}
