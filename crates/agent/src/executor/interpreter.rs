//! Chooses the program that runs a script: the interpreter the execution names, else the
//! script's `#!` line, else PowerShell for a first line of `#ps1` (as OCI's Run Command does),
//! else bash, else sh. A program the machine lacks is found out here, before anything runs.

use std::path::PathBuf;

/// Names that only exist on Windows. Compared without case and without `.exe`, as Windows does.
const WINDOWS_ONLY: [&str; 2] = ["cmd", "powershell"];
/// pwsh runs a script file only with this extension.
const POWERSHELL_SCRIPT: &str = "script.ps1";
const PLAIN_SCRIPT: &str = "script";
const POWERSHELL_ARGS: [&str; 3] = ["-NoProfile", "-NonInteractive", "-File"];

/// How the script file is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Launch {
    /// The kernel runs the script file itself, by its `#!` line.
    Itself,
    /// `program args... <script file>`.
    With {
        program: PathBuf,
        args: &'static [&'static str],
        script_file_name: &'static str,
    },
}

impl Launch {
    /// The name the script is written under in its work directory.
    pub(super) fn script_file_name(&self) -> &'static str {
        match self {
            Launch::Itself => PLAIN_SCRIPT,
            Launch::With {
                script_file_name, ..
            } => script_file_name,
        }
    }
}

/// Picks how to run `script`. `find` resolves a program name (or checks an absolute path) the
/// way the script's own PATH would. The error is the message of an `InterpreterNotFound`.
pub(super) fn choose(
    explicit: Option<&str>,
    script: &[u8],
    find: &dyn Fn(&str) -> Option<PathBuf>,
) -> Result<Launch, String> {
    if let Some(name) = explicit {
        return named(name, find);
    }
    let first_line = first_line(script);
    if let Some(shebang) = first_line.strip_prefix(b"#!") {
        check_shebang(shebang, find)?;
        return Ok(Launch::Itself);
    }
    if first_line.trim_ascii_end() == b"#ps1" {
        let Some(program) = find("pwsh") else {
            return Err(
                "the script's first line `#ps1` asks for PowerShell, but `pwsh` is not \
                 installed on this machine"
                    .to_string(),
            );
        };
        return Ok(powershell(program));
    }
    match find("bash").or_else(|| find("sh")) {
        Some(program) => Ok(plain(program)),
        None => Err("neither bash nor sh is installed on this machine".to_string()),
    }
}

/// An interpreter the execution names: `bash`, `python3`, `pwsh`, an absolute path...
fn named(name: &str, find: &dyn Fn(&str) -> Option<PathBuf>) -> Result<Launch, String> {
    let base = base_name(name).to_ascii_lowercase();
    let base = base.strip_suffix(".exe").unwrap_or(&base);
    if WINDOWS_ONLY.contains(&base) {
        return Err(format!(
            "interpreter `{name}` is Windows-only and this machine runs {}",
            std::env::consts::OS
        ));
    }
    let Some(program) = find(name) else {
        return Err(format!(
            "interpreter `{name}` is not installed on this machine"
        ));
    };
    if base.starts_with("pwsh") {
        Ok(powershell(program))
    } else {
        Ok(plain(program))
    }
}

fn plain(program: PathBuf) -> Launch {
    Launch::With {
        program,
        args: &[],
        script_file_name: PLAIN_SCRIPT,
    }
}

fn powershell(program: PathBuf) -> Launch {
    Launch::With {
        program,
        args: &POWERSHELL_ARGS,
        script_file_name: POWERSHELL_SCRIPT,
    }
}

/// The last component of a path in either separator, so that `C:\Windows\cmd.exe` is `cmd.exe`.
fn base_name(name: &str) -> &str {
    name.rsplit(['/', '\\']).next().unwrap_or(name)
}

/// The first line without its `\n`, and without a UTF-8 byte order mark (editors on Windows
/// put one before `#ps1`).
fn first_line(script: &[u8]) -> &[u8] {
    let script = script.strip_prefix(b"\xef\xbb\xbf").unwrap_or(script);
    let end = script
        .iter()
        .position(|byte| *byte == b'\n')
        .unwrap_or(script.len());
    &script[..end]
}

/// Checks that what a `#!` line names exists, so that a missing interpreter is reported by
/// name instead of as the kernel's "No such file or directory". The kernel splits the line at
/// the first space or tab; `/usr/bin/env NAME` is followed to NAME. Relative paths are left to
/// the kernel.
fn check_shebang(shebang: &[u8], find: &dyn Fn(&str) -> Option<PathBuf>) -> Result<(), String> {
    let line = String::from_utf8_lossy(shebang);
    let mut words = line.split([' ', '\t']).filter(|word| !word.is_empty());
    let Some(program) = words.next() else {
        return Err("the script's `#!` line names no interpreter".to_string());
    };
    if !program.starts_with('/') {
        return Ok(());
    }
    check_word(program, "names", find)?;
    if base_name(program) == "env" {
        // `env -S python3 -u`, `env LANG=C python3`: the first word that is neither an option
        // nor an assignment is the command.
        let command = words.find(|word| !word.starts_with('-') && !word.contains('='));
        if let Some(command) = command {
            check_word(command, "asks env for", find)?;
        }
    }
    Ok(())
}

fn check_word(
    word: &str,
    verb: &str,
    find: &dyn Fn(&str) -> Option<PathBuf>,
) -> Result<(), String> {
    if let Some(trimmed) = word.strip_suffix('\r') {
        return Err(format!(
            "the script's `#!` line {verb} `{trimmed}` followed by a carriage return (Windows \
             line endings), which is not installed on this machine; convert the script to Unix \
             line endings"
        ));
    }
    if find(word).is_none() {
        return Err(format!(
            "the script's `#!` line {verb} `{word}`, which is not installed on this machine"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chooses with a machine that has exactly `installed` (names found under /bin, absolute
    /// paths as they are), and describes the choice as a command line.
    fn check(explicit: Option<&str>, script: &str, installed: &[&str], expected: &str) {
        let find = |name: &str| {
            installed.contains(&name).then(|| {
                if name.starts_with('/') {
                    PathBuf::from(name)
                } else {
                    PathBuf::from("/bin").join(name)
                }
            })
        };
        let actual = match choose(explicit, script.as_bytes(), &find) {
            Ok(Launch::Itself) => "./script".to_string(),
            Ok(Launch::With {
                program,
                args,
                script_file_name,
            }) => {
                let mut words = vec![program.display().to_string()];
                words.extend(args.iter().map(|arg| arg.to_string()));
                words.push(script_file_name.to_string());
                words.join(" ")
            }
            Err(message) => format!("error: {message}"),
        };
        assert_eq!(
            actual, expected,
            "interpreter {explicit:?}, script {script:?}"
        );
    }

    const ALL: &[&str] = &["bash", "sh", "python3", "pwsh", "/bin/sh", "/usr/bin/env"];

    #[test]
    fn default_choices() {
        check(None, "echo hi", ALL, "/bin/bash script");
        check(None, "echo hi", &["sh"], "/bin/sh script");
        check(
            None,
            "echo hi",
            &[],
            "error: neither bash nor sh is installed on this machine",
        );
        check(None, "#!/bin/sh\necho hi", ALL, "./script");
        check(None, "#!/usr/bin/env python3\nprint()", ALL, "./script");
        check(
            None,
            "#!/usr/bin/env -S LANG=C python3 -u\n",
            ALL,
            "./script",
        );
        check(None, "#!relative/interpreter\n", ALL, "./script");
        check(
            None,
            "#ps1\nWrite-Output hi",
            ALL,
            "/bin/pwsh -NoProfile -NonInteractive -File script.ps1",
        );
        check(
            None,
            "\u{feff}#ps1 \r\nWrite-Output hi",
            ALL,
            "/bin/pwsh -NoProfile -NonInteractive -File script.ps1",
        );
        check(None, "#ps1x\n", ALL, "/bin/bash script");
        check(None, "# ps1\n", ALL, "/bin/bash script");
        check(None, "echo\n#ps1\n", ALL, "/bin/bash script");
    }

    #[test]
    fn missing_interpreters_are_named() {
        check(
            None,
            "#ps1\n",
            &["bash"],
            "error: the script's first line `#ps1` asks for PowerShell, but `pwsh` is not \
             installed on this machine",
        );
        check(
            None,
            "#!/no/such/interpreter -e\n",
            ALL,
            "error: the script's `#!` line names `/no/such/interpreter`, which is not installed \
             on this machine",
        );
        check(
            None,
            "#!/usr/bin/env ruby\n",
            ALL,
            "error: the script's `#!` line asks env for `ruby`, which is not installed on this \
             machine",
        );
        check(
            None,
            "#!/bin/sh\r\necho hi\r\n",
            ALL,
            "error: the script's `#!` line names `/bin/sh` followed by a carriage return \
             (Windows line endings), which is not installed on this machine; convert the \
             script to Unix line endings",
        );
        check(
            None,
            "#!\n",
            ALL,
            "error: the script's `#!` line names no interpreter",
        );
    }

    #[test]
    fn explicit_choices() {
        check(Some("bash"), "#!/bin/sh\n", ALL, "/bin/bash script");
        check(Some("sh"), "#ps1\n", ALL, "/bin/sh script");
        check(Some("python3"), "print()", ALL, "/bin/python3 script");
        check(
            Some("pwsh"),
            "Write-Output hi",
            ALL,
            "/bin/pwsh -NoProfile -NonInteractive -File script.ps1",
        );
        check(Some("/bin/sh"), "echo", ALL, "/bin/sh script");
        check(
            Some("python3"),
            "print()",
            &["bash"],
            "error: interpreter `python3` is not installed on this machine",
        );
        let os = std::env::consts::OS;
        for windows_only in ["cmd", "CMD.EXE", "powershell", "C:\\Windows\\cmd.exe"] {
            check(
                Some(windows_only),
                "dir",
                ALL,
                &format!(
                    "error: interpreter `{windows_only}` is Windows-only and this machine runs {os}"
                ),
            );
        }
    }
}
