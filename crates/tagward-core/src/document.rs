//! Reading a JSON or YAML document into a typed wire form, with errors that
//! name the JSON path and the reason: the one loader behind world files,
//! scenario files and `tagward import`.

use std::path::Path;

use serde::de::DeserializeOwned;
use thiserror::Error;

/// A document that could not be read or did not fit its type.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}{}{message}", path, if path.is_empty() { "" } else { ": " })]
pub struct DocumentError {
    /// Where in the document (`steps[2].expect`); empty for the whole of it.
    pub path: String,
    pub message: String,
}

/// Is this file YAML (by its extension)? Anything else is read as JSON.
pub fn is_yaml(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// Parses `text` (YAML when `yaml`, else JSON) into `T`.
pub fn parse<T: DeserializeOwned>(text: &str, yaml: bool) -> Result<T, DocumentError> {
    let value: serde_json::Value = if yaml {
        serde_norway::from_str(text)
            .map_err(|e| DocumentError { path: String::new(), message: format!("not valid YAML: {e}") })?
    } else {
        serde_json::from_str(text).map_err(|e| DocumentError { path: String::new(), message: format!("not valid JSON: {e}") })?
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        DocumentError { path, message: e.into_inner().to_string() }
    })
}

/// Reads and parses a file; the error message does not name the file (the
/// caller does).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, DocumentError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| DocumentError { path: String::new(), message: format!("cannot read: {e}") })?;
    parse(&text, is_yaml(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        items: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        n: u32,
    }

    #[test]
    fn errors_name_the_path() {
        let e = parse::<Doc>(r#"{"items": [{"n": 1}, {"n": "x"}]}"#, false).unwrap_err();
        assert_eq!(e.path, "items[1].n");
        let e = parse::<Doc>("items:\n  - m: 1\n", true).unwrap_err();
        assert_eq!(e.path, "items[0].m");
        assert!(e.message.contains("unknown field `m`"), "{e}");
        assert!(parse::<Doc>("{", false).unwrap_err().message.starts_with("not valid JSON"));
    }
}
