//! Field paths, the "where" of an error: `Statement[2].Effect`,
//! `resources[1].tags`, `context["aws:SourceIp"]`. Kept as segments so that
//! code can ask where an error arose without parsing its text; displayed
//! exactly as the messages have always spelled them.

use std::fmt;

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A field or element name: `.Effect` (no dot in front when first).
    Field(Box<str>),
    /// A list index: `[2]`.
    Index(usize),
    /// A map key, quoted: `["aws:SourceIp"]`.
    Key(Box<str>),
}

/// A path from the top of a document or request to one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(Vec<Segment>);

impl FieldPath {
    /// The empty path: the document itself.
    pub fn root() -> FieldPath {
        FieldPath(Vec::new())
    }

    /// A path of one field.
    pub fn field(name: impl Into<Box<str>>) -> FieldPath {
        FieldPath(vec![Segment::Field(name.into())])
    }

    /// This path, then field `name`.
    pub fn then(&self, name: impl Into<Box<str>>) -> FieldPath {
        let mut next = self.clone();
        next.0.push(Segment::Field(name.into()));
        next
    }

    /// This path, then list index `index`.
    pub fn at(&self, index: usize) -> FieldPath {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }

    /// This path, then map key `key`.
    pub fn key(&self, key: impl Into<Box<str>>) -> FieldPath {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.into()));
        next
    }

    /// This path, then all of `rest`.
    pub fn join(&self, rest: &FieldPath) -> FieldPath {
        let mut next = self.clone();
        next.0.extend(rest.0.iter().cloned());
        next
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when some segment is the field `name`.
    pub fn has_field(&self, name: &str) -> bool {
        self.0.iter().any(|s| matches!(s, Segment::Field(f) if &**f == name))
    }

    /// The last field name, skipping indices and keys after it.
    pub fn last_field(&self) -> Option<&str> {
        self.0.iter().rev().find_map(|s| match s {
            Segment::Field(f) => Some(&**f),
            _ => None,
        })
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Field(name) if i == 0 => f.write_str(name)?,
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => write!(f, "[{key:?}]")?,
            }
        }
        Ok(())
    }
}

/// A path given as text is one field of that name (it is not parsed).
impl From<&str> for FieldPath {
    fn from(name: &str) -> FieldPath {
        FieldPath::field(name)
    }
}

impl From<&String> for FieldPath {
    fn from(name: &String) -> FieldPath {
        FieldPath::field(name.as_str())
    }
}

impl From<String> for FieldPath {
    fn from(name: String) -> FieldPath {
        FieldPath::field(name)
    }
}

/// Compares displayed text with an expected string as it is written.
struct Compare<'a> {
    rest: &'a str,
    same: bool,
}

impl fmt::Write for Compare<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match self.rest.strip_prefix(s) {
            Some(rest) if self.same => self.rest = rest,
            _ => self.same = false,
        }
        Ok(())
    }
}

impl FieldPath {
    /// True when the path displays as `text`.
    pub fn is(&self, text: &str) -> bool {
        let mut compare = Compare { rest: text, same: true };
        let _ = fmt::Write::write_fmt(&mut compare, format_args!("{self}"));
        compare.same && compare.rest.is_empty()
    }
}

impl PartialEq<str> for FieldPath {
    fn eq(&self, other: &str) -> bool {
        self.is(other)
    }
}

impl PartialEq<&str> for FieldPath {
    fn eq(&self, other: &&str) -> bool {
        self.is(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displayed_as_the_messages_spell_paths() {
        assert_eq!(FieldPath::field("Statement").at(2).then("Effect").to_string(), "Statement[2].Effect");
        assert_eq!(FieldPath::field("resources").at(1).then("tags").to_string(), "resources[1].tags");
        assert_eq!(FieldPath::field("context").key("aws:SourceIp").to_string(), r#"context["aws:SourceIp"]"#);
        assert_eq!(FieldPath::root().to_string(), "");
        let p = FieldPath::field("put_resource").join(&FieldPath::field("key_policy").then("Statement"));
        assert_eq!(p, "put_resource.key_policy.Statement");
        assert!(p.has_field("key_policy") && !p.has_field("key"));
        assert_eq!(p.last_field(), Some("Statement"));
        assert!(!p.is("put_resource.key_policy") && !p.is("put_resource.key_policy.Statements"));
    }
}
