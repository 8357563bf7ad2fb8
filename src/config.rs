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

/// Reads and deserializes one YAML (or JSON) file.
pub fn read_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
    parse_yaml(path, &text)
}

pub fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    serde_saphyr::from_str(text).map_err(|e| ConfigError::at(path, None, one_line(&e.to_string())))
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}
