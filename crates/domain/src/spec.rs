//! What a run asks for, and the validation that turns a request into a `RunSpec`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::ids::ExecutionId;
use crate::labels::{Selector, SelectorError};
use crate::limits::Limits;
use crate::rate::RateLimit;
use crate::template::{TemplateError, render, validate_parameter_name};
use crate::units::parse_duration;

/// A request that failed validation: a stable machine-readable code, a sentence for a person,
/// and the request field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub code: &'static str,
    pub message: String,
    pub field: String,
}

impl ValidationError {
    pub fn new(code: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: field.into(),
        }
    }
}

/// The machines a run is aimed at: exactly one way of naming them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// Machines by name or id.
    Machines(Vec<String>),
    Selector(Selector),
    All,
}

/// An interpreter named by the operator: a program name looked up on the machine's `PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter(String);

impl Interpreter {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Interpreter names are plain program names (`bash`, `python3`) or absolute paths.
pub fn validate_interpreter(name: &str) -> Result<Interpreter, ValidationError> {
    let plain = !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+' | '/'));
    if plain {
        Ok(Interpreter(name.to_string()))
    } else {
        Err(ValidationError::new(
            "InvalidInterpreter",
            "interpreter",
            format!("interpreter `{name}` is not a program name such as bash, sh or python3"),
        ))
    }
}

/// Environment variable names: not empty, no `=` and no NUL.
pub fn validate_env_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && !name.contains(['=', '\0'])
}

/// A run as the operator asked for it, before validation. Durations are text (`90s`, `5m`).
/// Its `Debug` leaves out the protected parameters' values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RunRequest {
    pub machines: Vec<String>,
    pub selector: Option<String>,
    pub all: bool,
    pub script: String,
    pub interpreter: Option<String>,
    pub parameters: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout: Option<String>,
    pub delivery_timeout: Option<String>,
    /// `10` or `25%`: most executions in flight at once.
    pub max_concurrency: Option<String>,
    /// `0`, `5` or `10%`: failures allowed before the executions not yet sent are skipped.
    pub max_errors: Option<String>,
    /// Fetch the script from here (HTTP or HTTPS) instead of `script`.
    pub script_uri: Option<String>,
    /// Hex SHA-256 the fetched script must have.
    pub script_sha256: Option<String>,
    /// Upload the whole stdout / stderr here (HTTP PUT) when the execution ends.
    pub output_blob_uri: Option<String>,
    pub error_blob_uri: Option<String>,
    /// Exported as environment variables like `parameters`, but never shown again: not in any
    /// answer, log or event.
    pub protected_parameters: BTreeMap<String, String>,
    /// Run the script as this user instead of the agent's (which must then be root).
    pub run_as_user: Option<String>,
}

/// A validated run: what is stored and what each machine is sent. Its `Debug` leaves out the
/// protected parameters' values.
#[derive(Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// The script as given, `{{parameters}}` and all.
    pub script: String,
    pub interpreter: Option<Interpreter>,
    pub parameters: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout: Duration,
    pub delivery_timeout: Duration,
    pub max_concurrency: Option<RateLimit>,
    pub max_errors: Option<RateLimit>,
    pub script_uri: Option<String>,
    pub script_sha256: Option<String>,
    pub output_blob_uri: Option<String>,
    pub error_blob_uri: Option<String>,
    pub protected_parameters: BTreeMap<String, String>,
    pub run_as_user: Option<String>,
    /// Earlier executions on the same machine that must be gone before this run starts
    /// there: the open runs of a named run command, which its replacement cancels.
    pub replaces: Vec<ExecutionId>,
}

impl std::fmt::Debug for RunRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunRequest")
            .field("machines", &self.machines)
            .field("selector", &self.selector)
            .field("all", &self.all)
            .field("script", &self.script)
            .field("parameters", &self.parameters)
            .field(
                "protected_parameters",
                &self.protected_parameters.keys().collect::<Vec<_>>(),
            )
            .field("run_as_user", &self.run_as_user)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RunSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunSpec")
            .field("script", &self.script)
            .field("interpreter", &self.interpreter)
            .field("parameters", &self.parameters)
            .field(
                "protected_parameters",
                &self.protected_parameters.keys().collect::<Vec<_>>(),
            )
            .field("run_as_user", &self.run_as_user)
            .field("timeout", &self.timeout)
            .field("script_uri", &self.script_uri.is_some())
            .field("replaces", &self.replaces)
            .finish_non_exhaustive()
    }
}

impl RunSpec {
    /// The script with its parameters, protected ones included, substituted. Validation
    /// already proved this succeeds.
    pub fn rendered_script(&self) -> Result<String, TemplateError> {
        render(&self.script, &self.all_parameters())
    }

    /// Plain and protected parameters together: what the script's environment gets.
    pub fn all_parameters(&self) -> BTreeMap<String, String> {
        let mut all = self.parameters.clone();
        all.extend(
            self.protected_parameters
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        all
    }
}

impl RunRequest {
    /// Checks every field against `limits` and returns the targets and the spec, or the first
    /// problem found.
    pub fn validate(self, limits: &Limits) -> Result<(Targets, RunSpec), ValidationError> {
        if self.machines.len() > limits.max_named_targets {
            return Err(ValidationError::new(
                "TooManyTargets",
                "targets.machines",
                format!(
                    "{} machines named, at most {} allowed: use a label selector for more",
                    self.machines.len(),
                    limits.max_named_targets
                ),
            ));
        }
        let targets = self.targets()?;

        match (&self.script_uri, self.script.trim().is_empty()) {
            (Some(_), false) => {
                return Err(ValidationError::new(
                    "ConflictingScript",
                    "script_uri",
                    "give the script inline or as script_uri, not both",
                ));
            }
            (Some(uri), true) => check_uri(uri, "script_uri")?,
            (None, true) => {
                return Err(ValidationError::new(
                    "EmptyScript",
                    "script",
                    "the script is empty",
                ));
            }
            (None, false) => {}
        }
        if let Some(digest) = &self.script_sha256 {
            if self.script_uri.is_none() {
                return Err(ValidationError::new(
                    "UnexpectedScriptSha256",
                    "script_sha256",
                    "script_sha256 checks a downloaded script: give it with script_uri",
                ));
            }
            if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ValidationError::new(
                    "InvalidScriptSha256",
                    "script_sha256",
                    "script_sha256 must be 64 hexadecimal digits",
                ));
            }
        }
        for (uri, field) in [
            (&self.output_blob_uri, "output_blob_uri"),
            (&self.error_blob_uri, "error_blob_uri"),
        ] {
            if let Some(uri) = uri {
                check_uri(uri, field)?;
            }
        }
        if self.script.len() as u64 > limits.max_script_bytes {
            return Err(ValidationError::new(
                "ScriptTooLarge",
                "script",
                format!(
                    "the script is {} bytes, over the limit of {} bytes (max_script_bytes)",
                    self.script.len(),
                    limits.max_script_bytes
                ),
            ));
        }

        check_parameters(&self.parameters, "parameters", limits)?;
        check_parameters(&self.protected_parameters, "protected_parameters", limits)?;
        if let Some(name) = self
            .protected_parameters
            .keys()
            .find(|name| self.parameters.contains_key(*name))
        {
            return Err(ValidationError::new(
                "DuplicateParameter",
                format!("protected_parameters.{name}"),
                format!("parameter `{name}` is given both plain and protected: give it once"),
            ));
        }
        if let Some(user) = &self.run_as_user
            && !valid_user_name(user)
        {
            return Err(ValidationError::new(
                "InvalidRunAsUser",
                "run_as_user",
                format!("run_as_user `{user}` is not a user name"),
            ));
        }
        let mut all_parameters = self.parameters.clone();
        all_parameters.extend(self.protected_parameters.clone());
        if let Err(error) = render(&self.script, &all_parameters) {
            let field = match &error {
                TemplateError::Missing(name) => format!("parameters.{name}"),
                TemplateError::InvalidName(_) => "parameters".to_string(),
            };
            return Err(ValidationError::new(
                "MissingParameter",
                field,
                error.to_string(),
            ));
        }

        if self.env.len() > limits.max_parameters {
            return Err(ValidationError::new(
                "TooManyEnvironmentVariables",
                "env",
                format!(
                    "{} environment variables given, at most {} allowed",
                    self.env.len(),
                    limits.max_parameters
                ),
            ));
        }
        for (name, value) in &self.env {
            if !validate_env_name(name) {
                return Err(ValidationError::new(
                    "InvalidEnvironmentName",
                    "env",
                    format!(
                        "environment variable name `{name}` is invalid: it must be non-empty without `=`"
                    ),
                ));
            }
            if value.contains('\0') {
                return Err(ValidationError::new(
                    "InvalidEnvironmentValue",
                    format!("env.{name}"),
                    format!("environment variable `{name}` contains a NUL byte"),
                ));
            }
        }

        let interpreter = self
            .interpreter
            .as_deref()
            .map(validate_interpreter)
            .transpose()?;

        if let Some(workdir) = &self.workdir
            && (workdir.is_empty() || workdir.contains('\0'))
        {
            return Err(ValidationError::new(
                "InvalidWorkdir",
                "workdir",
                "the working directory must be a non-empty path",
            ));
        }

        let timeout = duration_field(
            self.timeout.as_deref(),
            "timeout",
            limits.default_timeout,
            limits,
        )?;
        let delivery_timeout = duration_field(
            self.delivery_timeout.as_deref(),
            "delivery_timeout",
            limits.default_delivery_timeout,
            limits,
        )?;

        let max_concurrency = self
            .max_concurrency
            .as_deref()
            .map(|text| RateLimit::parse(text, 1))
            .transpose()
            .map_err(|message| {
                ValidationError::new(
                    "InvalidMaxConcurrency",
                    "max_concurrency",
                    format!("max_concurrency: {message}"),
                )
            })?;
        let max_errors = self
            .max_errors
            .as_deref()
            .map(|text| RateLimit::parse(text, 0))
            .transpose()
            .map_err(|message| {
                ValidationError::new(
                    "InvalidMaxErrors",
                    "max_errors",
                    format!("max_errors: {message}"),
                )
            })?;

        Ok((
            targets,
            RunSpec {
                script: self.script,
                interpreter,
                parameters: self.parameters,
                env: self.env,
                workdir: self.workdir,
                timeout,
                delivery_timeout,
                max_concurrency,
                max_errors,
                script_uri: self.script_uri,
                script_sha256: self.script_sha256.map(|digest| digest.to_ascii_lowercase()),
                output_blob_uri: self.output_blob_uri,
                error_blob_uri: self.error_blob_uri,
                protected_parameters: self.protected_parameters,
                run_as_user: self.run_as_user,
                replaces: Vec::new(),
            },
        ))
    }

    fn targets(&self) -> Result<Targets, ValidationError> {
        let given = [!self.machines.is_empty(), self.selector.is_some(), self.all]
            .iter()
            .filter(|given| **given)
            .count();
        if given == 0 {
            return Err(ValidationError::new(
                "NoTargets",
                "targets",
                "name the targets: machines by name or id, a label selector, or all",
            ));
        }
        if given > 1 {
            return Err(ValidationError::new(
                "ConflictingTargets",
                "targets",
                "give only one of machines, selector and all",
            ));
        }
        if let Some(selector) = &self.selector {
            let selector = Selector::parse(selector).map_err(|SelectorError(message)| {
                ValidationError::new("InvalidSelector", "targets.selector", message)
            })?;
            return Ok(Targets::Selector(selector));
        }
        if self.all {
            return Ok(Targets::All);
        }
        if let Some(empty) = self.machines.iter().position(|name| name.trim().is_empty()) {
            return Err(ValidationError::new(
                "InvalidMachine",
                format!("targets.machines[{empty}]"),
                "a machine name or id is empty",
            ));
        }
        // Kept in the order given, so that `targets.machines[i]` in an error names the entry
        // the caller wrote; repeats are dropped later, when names resolve to machines.
        Ok(Targets::Machines(self.machines.clone()))
    }
}

/// Checks one map of parameters (plain or protected; `field` says which): count, names and
/// values. A protected value is never quoted in an error.
fn check_parameters(
    parameters: &BTreeMap<String, String>,
    field: &str,
    limits: &Limits,
) -> Result<(), ValidationError> {
    if parameters.len() > limits.max_parameters {
        return Err(ValidationError::new(
            "TooManyParameters",
            field,
            format!(
                "{} {field} given, at most {} allowed",
                parameters.len(),
                limits.max_parameters
            ),
        ));
    }
    for (name, value) in parameters {
        validate_parameter_name(name).map_err(|error| {
            ValidationError::new("InvalidParameterName", field, error.to_string())
        })?;
        if clobbers_environment(name) {
            return Err(ValidationError::new(
                "ReservedParameterName",
                format!("{field}.{name}"),
                format!(
                    "parameter `{name}` would replace the environment variable of the same \
                     name that the script's process needs; choose another name"
                ),
            ));
        }
        if value.len() > limits.max_parameter_value_bytes {
            return Err(ValidationError::new(
                "ParameterTooLarge",
                format!("{field}.{name}"),
                format!(
                    "parameter `{name}` is {} bytes, over the limit of {}",
                    value.len(),
                    limits.max_parameter_value_bytes
                ),
            ));
        }
        if value.contains('\0') {
            return Err(ValidationError::new(
                "InvalidParameterValue",
                format!("{field}.{name}"),
                format!("parameter `{name}` contains a NUL byte"),
            ));
        }
    }
    Ok(())
}

/// A POSIX user name as `useradd` accepts it (or a numeric uid): nothing a shell or a path
/// could misread.
fn valid_user_name(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && !user.starts_with('-')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$' | '@'))
}

/// Parameters are exported as environment variables of the same name; these names would
/// replace what the script's process needs to run at all.
fn clobbers_environment(name: &str) -> bool {
    const RESERVED: [&str; 10] = [
        "PATH", "HOME", "SHELL", "USER", "LOGNAME", "PWD", "IFS", "ENV", "BASH_ENV", "TMPDIR",
    ];
    let upper = name.to_ascii_uppercase();
    RESERVED.contains(&upper.as_str()) || upper.starts_with("LD_") || upper.starts_with("FLEETRUN_")
}

/// An `http://` or `https://` URL with a host: the agent fetches or uploads with it.
fn check_uri(uri: &str, field: &str) -> Result<(), ValidationError> {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"));
    let host = rest.map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
    match host {
        Some(host) if !host.is_empty() && !uri.chars().any(char::is_whitespace) => Ok(()),
        _ => Err(ValidationError::new(
            "InvalidUri",
            field,
            format!("{field} must be an http:// or https:// URL"),
        )),
    }
}

fn duration_field(
    text: Option<&str>,
    field: &str,
    default: Duration,
    limits: &Limits,
) -> Result<Duration, ValidationError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let duration = parse_duration(text).map_err(|message| {
        ValidationError::new("InvalidDuration", field, format!("{field}: {message}"))
    })?;
    if duration.is_zero() {
        return Err(ValidationError::new(
            "InvalidDuration",
            field,
            format!("{field} must be longer than zero"),
        ));
    }
    if duration > limits.max_timeout {
        return Err(ValidationError::new(
            "InvalidDuration",
            field,
            format!(
                "{field} of {} is over the limit of {}",
                humantime::format_duration(duration),
                humantime::format_duration(limits.max_timeout)
            ),
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(script: &str) -> RunRequest {
        RunRequest {
            all: true,
            script: script.to_string(),
            ..RunRequest::default()
        }
    }

    fn error_of(request: RunRequest) -> (&'static str, String) {
        let error = request
            .validate(&Limits::default())
            .expect_err("should be rejected");
        (error.code, error.field)
    }

    #[test]
    fn a_plain_request_validates_with_defaults() {
        let (targets, spec) = request("echo hi")
            .validate(&Limits::default())
            .expect("valid");
        assert_eq!(targets, Targets::All);
        assert_eq!(spec.timeout, Limits::default().default_timeout);
        assert_eq!(spec.rendered_script().ok().as_deref(), Some("echo hi"));
    }

    #[test]
    fn bad_requests_name_the_problem_and_the_field() {
        assert_eq!(error_of(request("  \n")), ("EmptyScript", "script".into()));
        let limits = Limits {
            max_script_bytes: 4,
            ..Limits::default()
        };
        let error = request("echo hi").validate(&limits).expect_err("too large");
        assert_eq!(
            (error.code, error.field.as_str()),
            ("ScriptTooLarge", "script")
        );

        assert_eq!(
            error_of(request("echo {{who}}")),
            ("MissingParameter", "parameters.who".into())
        );
        let mut bad_name = request("echo");
        bad_name.parameters.insert("no spaces".into(), "x".into());
        assert_eq!(
            error_of(bad_name),
            ("InvalidParameterName", "parameters".into())
        );

        let mut bad_timeout = request("true");
        bad_timeout.timeout = Some("soon".into());
        assert_eq!(error_of(bad_timeout), ("InvalidDuration", "timeout".into()));
        let mut zero = request("true");
        zero.delivery_timeout = Some("0s".into());
        assert_eq!(
            error_of(zero),
            ("InvalidDuration", "delivery_timeout".into())
        );

        let mut no_targets = request("true");
        no_targets.all = false;
        assert_eq!(error_of(no_targets), ("NoTargets", "targets".into()));
        let mut both = request("true");
        both.selector = Some("env=prod".into());
        assert_eq!(error_of(both), ("ConflictingTargets", "targets".into()));
        let selector = RunRequest {
            selector: Some("env=".into()),
            script: "true".into(),
            ..RunRequest::default()
        };
        let (targets, _) = selector
            .validate(&Limits::default())
            .expect("empty value is a value");
        assert!(matches!(targets, Targets::Selector(_)));
        let malformed = RunRequest {
            selector: Some("env=prod,,".into()),
            script: "true".into(),
            ..RunRequest::default()
        };
        assert_eq!(
            error_of(malformed),
            ("InvalidSelector", "targets.selector".into())
        );

        let mut concurrency = request("true");
        concurrency.max_concurrency = Some("0".into());
        assert_eq!(
            error_of(concurrency),
            ("InvalidMaxConcurrency", "max_concurrency".into())
        );
        let mut errors = request("true");
        errors.max_errors = Some("lots".into());
        assert_eq!(error_of(errors), ("InvalidMaxErrors", "max_errors".into()));

        let mut path = request("echo {{PATH}}");
        path.parameters.insert("PATH".into(), "/tmp".into());
        assert_eq!(
            error_of(path),
            ("ReservedParameterName", "parameters.PATH".into())
        );
        let mut preload = request("true");
        preload
            .parameters
            .insert("LD_PRELOAD".into(), "x.so".into());
        assert_eq!(error_of(preload).0, "ReservedParameterName");

        let mut both = request("true");
        both.script_uri = Some("https://example.com/s.sh".into());
        assert_eq!(error_of(both), ("ConflictingScript", "script_uri".into()));
        let mut uri = request("");
        uri.script_uri = Some("ftp://example.com/s.sh".into());
        assert_eq!(error_of(uri), ("InvalidUri", "script_uri".into()));
        let mut digest = request("");
        digest.script_uri = Some("https://example.com/s.sh".into());
        digest.script_sha256 = Some("abc".into());
        assert_eq!(
            error_of(digest),
            ("InvalidScriptSha256", "script_sha256".into())
        );
        let mut upload = request("true");
        upload.output_blob_uri = Some("not a url".into());
        assert_eq!(error_of(upload), ("InvalidUri", "output_blob_uri".into()));
        let mut fetched = request("");
        fetched.script_uri = Some("http://127.0.0.1:9/s.sh?sig=x".into());
        assert!(fetched.validate(&Limits::default()).is_ok());

        let mut env = request("true");
        env.env.insert("A=B".into(), "x".into());
        assert_eq!(error_of(env), ("InvalidEnvironmentName", "env".into()));
        let mut interpreter = request("true");
        interpreter.interpreter = Some("bash; rm -rf /".into());
        assert_eq!(
            error_of(interpreter),
            ("InvalidInterpreter", "interpreter".into())
        );
    }

    #[test]
    fn protected_parameters_render_but_never_show_in_debug() {
        let mut secret = request("echo {{who}} {{token}}");
        secret.parameters.insert("who".into(), "me".into());
        secret
            .protected_parameters
            .insert("token".into(), "s3cr3t".into());
        secret.run_as_user = Some("deploy".into());
        let (_, spec) = secret.validate(&Limits::default()).expect("valid");
        assert_eq!(spec.rendered_script().expect("renders"), "echo me s3cr3t");
        assert_eq!(spec.all_parameters().len(), 2);
        let shown = format!("{spec:?}");
        assert!(
            shown.contains("token") && !shown.contains("s3cr3t"),
            "{shown}"
        );

        let mut twice = request("true");
        twice.parameters.insert("a".into(), "1".into());
        twice.protected_parameters.insert("a".into(), "2".into());
        assert_eq!(
            error_of(twice),
            ("DuplicateParameter", "protected_parameters.a".into())
        );
        let mut reserved = request("true");
        reserved
            .protected_parameters
            .insert("LD_PRELOAD".into(), "x".into());
        assert_eq!(
            error_of(reserved),
            (
                "ReservedParameterName",
                "protected_parameters.LD_PRELOAD".into()
            )
        );
        for user in ["", "-rf", "a b", "x/y", "root;id"] {
            let mut run_as = request("true");
            run_as.run_as_user = Some(user.into());
            assert_eq!(
                error_of(run_as),
                ("InvalidRunAsUser", "run_as_user".into()),
                "{user:?}"
            );
        }
        for user in ["nobody", "1000", "svc-app", "ad.user@corp"] {
            let mut run_as = request("true");
            run_as.run_as_user = Some(user.into());
            assert!(run_as.validate(&Limits::default()).is_ok(), "{user}");
        }
    }
}
