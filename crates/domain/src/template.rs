//! `{{parameter}}` templating of scripts.

use std::collections::BTreeMap;

/// Why a script's parameters do not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("parameter name `{0}` is invalid: use 1 to 64 of A-Z a-z 0-9 _ -")]
    InvalidName(String),
    #[error("the script uses parameter `{0}`, but no value was given for it")]
    Missing(String),
}

/// Parameter names are 1 to 64 of `[A-Za-z0-9_-]`.
pub fn validate_parameter_name(name: &str) -> Result<(), TemplateError> {
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(TemplateError::InvalidName(name.to_string()))
    }
}

/// Replaces every `{{name}}` (spaces inside the braces allowed) with its value. Braces around
/// anything that is not a valid parameter name are left as they are, so scripts that print
/// `{{` for their own reasons keep working.
pub fn render(
    script: &str,
    parameters: &BTreeMap<String, String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(script.len());
    let mut rest = script;
    while let Some(start) = rest.find("{{") {
        let after_open = &rest[start + 2..];
        let Some(end) = after_open.find("}}") else {
            break;
        };
        let name = after_open[..end].trim();
        if validate_parameter_name(name).is_err() {
            out.push_str(&rest[..start + 2]);
            rest = after_open;
            continue;
        }
        let value = parameters
            .get(name)
            .ok_or_else(|| TemplateError::Missing(name.to_string()))?;
        out.push_str(&rest[..start]);
        out.push_str(value);
        rest = &after_open[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn check(script: &str, pairs: &[(&str, &str)], expected: Result<&str, TemplateError>) {
        assert_eq!(
            render(script, &params(pairs)),
            expected.map(str::to_string),
            "{script}"
        );
    }

    #[test]
    fn renders() {
        check("echo {{who}}", &[("who", "world")], Ok("echo world"));
        check("echo {{ who }}!", &[("who", "you")], Ok("echo you!"));
        check("{{a}}{{b}}", &[("a", "1"), ("b", "2")], Ok("12"));
        check("echo {{not a name}}", &[], Ok("echo {{not a name}}"));
        check("echo {{ {{x}}", &[("x", "1")], Ok("echo {{ 1"));
        check("echo {{open", &[], Ok("echo {{open"));
        check(
            "echo {{who}}",
            &[],
            Err(TemplateError::Missing("who".into())),
        );
        check("plain", &[("unused", "x")], Ok("plain"));
    }

    #[test]
    fn parameter_names() {
        assert!(validate_parameter_name("a_b-C9").is_ok());
        assert!(validate_parameter_name("").is_err());
        assert!(validate_parameter_name("a b").is_err());
        assert!(validate_parameter_name(&"x".repeat(65)).is_err());
        assert!(validate_parameter_name(&"x".repeat(64)).is_ok());
    }
}
