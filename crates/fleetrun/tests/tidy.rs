//! Tidy checks of the repository itself: the committed OpenAPI document matches the code,
//! every Rust file says what it is for, and no debugging leftovers ship.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn committed_openapi_matches_the_code() {
    let output = Command::new(env!("CARGO_BIN_EXE_fleetrun"))
        .arg("openapi")
        .output()
        .expect("run fleetrun openapi");
    assert!(output.status.success(), "fleetrun openapi failed");
    let generated = String::from_utf8(output.stdout).expect("UTF-8");
    let path = workspace_root().join("docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json differs from the code: run \
         `UPDATE_OPENAPI=1 cargo test -p fleetrun --test tidy` and commit it"
    );
}

#[test]
fn every_rust_file_opens_with_a_doc_line_and_ships_no_leftovers() {
    // Spelled in pieces so that this file does not trip its own check.
    let leftovers = [
        concat!("todo", "!("),
        concat!("dbg", "!("),
        concat!("unimplemented", "!("),
        concat!("#[", "ignore"),
    ];
    let mut files = Vec::new();
    rust_files(&workspace_root().join("crates"), &mut files);
    assert!(files.len() > 20, "found only {} Rust files", files.len());
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if !text.starts_with("//!") {
            problems.push(format!(
                "{}: does not start with a `//!` line",
                file.display()
            ));
        }
        for (number, line) in text.lines().enumerate() {
            for leftover in leftovers {
                if line.contains(leftover) {
                    problems.push(format!("{}:{}: `{leftover}`", file.display(), number + 1));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "tidy problems:\n{}",
        problems.join("\n")
    );
}
