//! Human units: durations ("90s", "1h30m") and byte sizes ("64MiB").

use std::time::Duration;

/// Parses a duration such as `500ms`, `30s`, `5m`, `1h30m` or `2d`. A bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{text}` is not a duration: expected a number followed by ms, s, m, h or d"
            ));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}` is not a duration: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            "d" => Duration::from_secs(number.saturating_mul(86400)),
            _ => {
                return Err(format!(
                    "`{text}` is not a duration: unknown unit `{unit}` (use ms, s, m, h or d)"
                ));
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Parses a byte size such as `1048576`, `512KiB`, `64MiB`, `1GiB` (also `KB`, `MB`, `GB` as
/// powers of 1000).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a byte size: expected a number such as 64MiB"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "`{text}` is not a byte size: unknown unit `{other}` (use B, KiB, MiB or GiB)"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Option<Duration>) {
        assert_eq!(parse_duration(text).ok(), expected, "{text}");
    }

    #[test]
    fn durations() {
        check("30", Some(Duration::from_secs(30)));
        check("30s", Some(Duration::from_secs(30)));
        check("500ms", Some(Duration::from_millis(500)));
        check("5m", Some(Duration::from_secs(300)));
        check("1h30m", Some(Duration::from_secs(5400)));
        check("2d", Some(Duration::from_secs(172800)));
        check("", None);
        check("s", None);
        check("10x", None);
        check("-5s", None);
        check("1.5h", None);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("1024").ok(), Some(1024));
        assert_eq!(parse_byte_size("64MiB").ok(), Some(64 << 20));
        assert_eq!(parse_byte_size("1 KiB").ok(), Some(1024));
        assert_eq!(parse_byte_size("2MB").ok(), Some(2_000_000));
        assert!(parse_byte_size("lots").is_err());
        assert!(parse_byte_size("5PB").is_err());
    }
}
