//! Reading configuration files (trials, mappings, decisions) and reporting their errors.
//!
//! Every configuration error names the file and, where the YAML parser or a span knows it, the
//! line, and says what to do: configuration is written by people, and a message that only
//! says "invalid" sends them hunting.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {message}", location(path, *line))]
    At { path: PathBuf, line: Option<u64>, message: String },
    #[error("{}", join(.0))]
    Many(Vec<ConfigError>),
}

fn location(path: &Path, line: Option<u64>) -> String {
    match line {
        Some(l) => format!("{}:{l}", path.display()),
        None => path.display().to_string(),
    }
}

fn join(errors: &[ConfigError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

impl ConfigError {
    pub fn at(path: &Path, line: Option<u64>, message: String) -> ConfigError {
        ConfigError::At {
            path: path.to_path_buf(),
            line,
            message,
        }
    }

    pub fn io(path: &Path, e: std::io::Error) -> ConfigError {
        ConfigError::at(path, None, format!("cannot read: {e}"))
    }

    /// Every individual error, flattened.
    pub fn all(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Many(v) => v.iter().flat_map(ConfigError::all).collect(),
            e => vec![e],
        }
    }
}

/// A value with the line it was written on, for error messages about it.
#[derive(Debug, Clone)]
pub struct Located<T> {
    pub value: T,
    pub line: Option<u64>,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = serde_saphyr::Spanned::<T>::deserialize(d)?;
        let line = s.referenced.line();
        Ok(Located {
            value: s.value,
            line: (line > 0).then_some(line),
        })
    }
}

/// The `*.yaml` / `*.yml` files of a folder, sorted so that loading order (and the config
/// hash) does not depend on the file system.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ConfigError::at(
                dir,
                None,
                "no such folder; run trialgate from its own folder, or pass --mappings / --trials-dir \
                 (or set TRIALGATE_MAPPINGS / TRIALGATE_TRIALS)"
                    .into(),
            ),
            _ => ConfigError::io(dir, e),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    v.sort();
    Ok(v)
}

/// Reads and deserializes one YAML (or JSON) file.
pub fn read_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
    parse_yaml(path, &text)
}

pub fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    serde_saphyr::from_str(text).map_err(|e| {
        let (line, message) = locate(&e.to_string());
        ConfigError::at(path, line, message)
    })
}

/// The parser's message is `error: line L column C: what`, followed by a source snippet that
/// repeats it: keep the first line, with the line number moved into the location.
fn locate(message: &str) -> (Option<u64>, String) {
    let first = message.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("invalid YAML");
    let first = first.strip_prefix("error:").unwrap_or(first).trim();
    if let Some(rest) = first.strip_prefix("line ") {
        let (num, after) = rest.split_once(' ').unwrap_or((rest, ""));
        if let Ok(line) = num.parse::<u64>() {
            let what = after.split_once(": ").map(|(_, w)| w).unwrap_or(after);
            return (Some(line), what.to_string());
        }
    }
    (None, first.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_errors_keep_the_line_and_the_message() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            a: u32,
        }
        let e = parse_yaml::<T>(Path::new("t.yaml"), "a: 1\nb: 2\n").unwrap_err().to_string();
        assert!(e.starts_with("t.yaml:2: "), "{e}");
        assert!(e.contains("unknown field `b`"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}
