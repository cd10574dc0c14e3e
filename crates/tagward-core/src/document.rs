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
///
/// JSON is read straight into `T`, with no tree of the whole document in
/// between (a world file of a million keys is a gigabyte of text). Only
/// when that fails is the document read again the careful way, as a tree
/// first, so that an error (or a document that only the tree accepts, such
/// as a repeated field) is reported exactly as before.
pub fn parse<T: DeserializeOwned>(text: &str, yaml: bool) -> Result<T, DocumentError> {
    if !yaml {
        let mut direct = serde_json::Deserializer::from_str(text);
        if let Ok(value) = T::deserialize(&mut direct) {
            if direct.end().is_ok() {
                return Ok(value);
            }
        }
    }
    parse_tree(text, yaml)
}

/// The document as a JSON tree, then `T`, with the path of what failed.
fn parse_tree<T: DeserializeOwned>(text: &str, yaml: bool) -> Result<T, DocumentError> {
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
    struct Item {
        n: u32,
    }

    #[test]
    fn the_direct_reading_and_the_tree_agree() {
        let doc: Doc = parse(r#"{"items": [{"n": 1}, {"n": 2}]}"#, false).unwrap();
        assert_eq!(doc.items.len(), 2);
        // A repeated field: the tree keeps the last, as it always has.
        let doc: Doc = parse(r#"{"items": [{"n": 1, "n": 3}]}"#, false).unwrap();
        assert_eq!(doc.items[0].n, 3);
        // Trailing text is refused as before.
        assert!(parse::<Doc>(r#"{"items": []} x"#, false).unwrap_err().message.starts_with("not valid JSON"));
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
