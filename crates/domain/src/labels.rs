//! Machine labels (`env=prod,role=web`) and the selectors that match them.

use std::collections::BTreeMap;
use std::fmt;

/// A machine's labels, sorted by key.
pub type Labels = BTreeMap<String, String>;

/// Why a label list or a selector could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(pub String);

const MAX_KEY_LEN: usize = 63;
const MAX_VALUE_LEN: usize = 63;

fn check_key(key: &str) -> Result<(), SelectorError> {
    let valid = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
    if valid {
        Ok(())
    } else {
        Err(SelectorError(format!(
            "label key `{key}` is invalid: use 1 to {MAX_KEY_LEN} of A-Z a-z 0-9 _ - . /"
        )))
    }
}

fn check_value(value: &str) -> Result<(), SelectorError> {
    let valid = value.len() <= MAX_VALUE_LEN
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err(SelectorError(format!(
            "label value `{value}` is invalid: use at most {MAX_VALUE_LEN} of A-Z a-z 0-9 _ - ."
        )))
    }
}

/// Parses `key=value,key=value` into labels. An empty text is no labels.
pub fn parse_labels(text: &str) -> Result<Labels, SelectorError> {
    let mut labels = Labels::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let Some((key, value)) = item.split_once('=') else {
            return Err(SelectorError(format!(
                "label `{item}` must be written key=value"
            )));
        };
        let (key, value) = (key.trim(), value.trim());
        check_key(key)?;
        check_value(value)?;
        if labels.insert(key.to_string(), value.to_string()).is_some() {
            return Err(SelectorError(format!("label `{key}` is given twice")));
        }
    }
    Ok(labels)
}

/// Validates labels that arrive already split (from the API).
pub fn check_labels(labels: &Labels) -> Result<(), SelectorError> {
    for (key, value) in labels {
        check_key(key)?;
        check_value(value)?;
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// A label selector: every term must hold. Terms are `key=value`, `key!=value`, `key` (the
/// label is present) and `!key` (it is absent), separated by commas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for term in text.split(',').map(str::trim) {
            if term.is_empty() {
                return Err(SelectorError(format!(
                    "selector `{text}` has an empty term: write key=value terms separated by commas"
                )));
            }
            let requirement = if let Some((key, value)) = term.split_once("!=") {
                let (key, value) = (key.trim(), value.trim());
                check_key(key)?;
                check_value(value)?;
                Requirement::NotEquals(key.to_string(), value.to_string())
            } else if let Some((key, value)) = term.split_once('=') {
                let value = value.strip_prefix('=').unwrap_or(value);
                let (key, value) = (key.trim(), value.trim());
                check_key(key)?;
                check_value(value)?;
                Requirement::Equals(key.to_string(), value.to_string())
            } else if let Some(key) = term.strip_prefix('!') {
                check_key(key.trim())?;
                Requirement::Absent(key.trim().to_string())
            } else {
                check_key(term)?;
                Requirement::Exists(term.to_string())
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                Requirement::Equals(key, value) => labels.get(key) == Some(value),
                Requirement::NotEquals(key, value) => labels.get(key) != Some(value),
                Requirement::Exists(key) => labels.contains_key(key),
                Requirement::Absent(key) => !labels.contains_key(key),
            })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, requirement) in self.requirements.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            match requirement {
                Requirement::Equals(key, value) => write!(f, "{key}={value}")?,
                Requirement::NotEquals(key, value) => write!(f, "{key}!={value}")?,
                Requirement::Exists(key) => write!(f, "{key}")?,
                Requirement::Absent(key) => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(text: &str) -> Labels {
        parse_labels(text).expect("labels parse")
    }

    fn check(selector: &str, machine: &str, expected: bool) {
        let selector = Selector::parse(selector).expect("selector parses");
        assert_eq!(
            selector.matches(&labels(machine)),
            expected,
            "{selector} ~ {machine}"
        );
    }

    #[test]
    fn selectors_match() {
        check("env=prod", "env=prod,role=web", true);
        check("env=prod,role=web", "env=prod,role=web", true);
        check("env=prod,role=db", "env=prod,role=web", false);
        check("env==prod", "env=prod", true);
        check("env!=prod", "env=dev", true);
        check("env!=prod", "role=web", true);
        check("env!=prod", "env=prod", false);
        check("gpu", "gpu=a100", true);
        check("gpu", "env=prod", false);
        check("!gpu", "env=prod", true);
        check(" env = prod , role=web ", "env=prod,role=web", true);
    }

    #[test]
    fn malformed_selectors_are_rejected() {
        for bad in ["", "env=prod,", ",", "env=pr od", "k@y=v", "=prod", "!"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn label_lists() {
        assert_eq!(labels("").len(), 0);
        assert_eq!(
            labels("env=prod, role=web").get("role").map(String::as_str),
            Some("web")
        );
        assert!(parse_labels("env").is_err());
        assert!(parse_labels("env=a,env=b").is_err());
    }
}
