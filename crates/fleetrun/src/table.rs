//! Plain tables for the terminal.

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};

pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    table
}

/// `2026-11-23T21:09:50.123Z` to `2026-11-23 21:09:50`.
pub(crate) fn short_time(time: Option<&str>) -> String {
    match time {
        Some(time) => time.get(..19).unwrap_or(time).replace('T', " "),
        None => "-".to_string(),
    }
}

/// The first line of a script, cut to `max` characters.
pub(crate) fn first_line(script: &str, max: usize) -> String {
    let line = script
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("");
    if line.chars().count() > max {
        format!("{}…", line.chars().take(max - 1).collect::<String>())
    } else {
        line.to_string()
    }
}
