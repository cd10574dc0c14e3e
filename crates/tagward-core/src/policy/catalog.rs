//! The actions Tagward knows by number: the AWS actions its callers ask
//! about most (the KMS actions, the IAM, STS, S3, Resource Groups
//! Tagging and Secrets Manager actions on tags), each numbered by its place
//! in the list.
//!
//! A statement's `Action` or `NotAction` is matched against every known
//! action once, when the policy is compiled, into an [`ActionSet`]; a
//! request's action is looked up once (by the hash [`super::ActionKey`]
//! computes anyway), and then whether a statement covers it is one bit.
//! An action that is not in the list is matched against the patterns as
//! before: the list makes decisions faster, never different (the sets are
//! built with the same matcher, and `tests::sets_agree_with_the_patterns`
//! compares them).

use std::sync::LazyLock;

use hashbrown::HashTable;

use super::pattern::{self, Literal, Pattern};
use super::Actions;

/// The known actions, lowercased, sorted (a prefix pattern covers one run
/// of them), at most [`ActionSet::CAPACITY`].
const KNOWN: &[&str] = &[
    "iam:createrole",
    "iam:createuser",
    "iam:deleterole",
    "iam:deleteuser",
    "iam:getrole",
    "iam:getuser",
    "iam:listroletags",
    "iam:listusertags",
    "iam:passrole",
    "iam:tagrole",
    "iam:taguser",
    "iam:untagrole",
    "iam:untaguser",
    "kms:cancelkeydeletion",
    "kms:connectcustomkeystore",
    "kms:createalias",
    "kms:createcustomkeystore",
    "kms:creategrant",
    "kms:createkey",
    "kms:decrypt",
    "kms:deletealias",
    "kms:deletecustomkeystore",
    "kms:deleteimportedkeymaterial",
    "kms:derivesharedsecret",
    "kms:describecustomkeystores",
    "kms:describekey",
    "kms:disablekey",
    "kms:disablekeyrotation",
    "kms:disconnectcustomkeystore",
    "kms:enablekey",
    "kms:enablekeyrotation",
    "kms:encrypt",
    "kms:generatedatakey",
    "kms:generatedatakeypair",
    "kms:generatedatakeypairwithoutplaintext",
    "kms:generatedatakeywithoutplaintext",
    "kms:generatemac",
    "kms:generaterandom",
    "kms:getkeypolicy",
    "kms:getkeyrotationstatus",
    "kms:getparametersforimport",
    "kms:getpublickey",
    "kms:importkeymaterial",
    "kms:listaliases",
    "kms:listgrants",
    "kms:listkeypolicies",
    "kms:listkeyrotations",
    "kms:listkeys",
    "kms:listresourcetags",
    "kms:listretirablegrants",
    "kms:putkeypolicy",
    "kms:reencryptfrom",
    "kms:reencryptto",
    "kms:replicatekey",
    "kms:retiregrant",
    "kms:revokegrant",
    "kms:rotatekeyondemand",
    "kms:schedulekeydeletion",
    "kms:sign",
    "kms:synchronizemultiregionkey",
    "kms:tagresource",
    "kms:untagresource",
    "kms:updatealias",
    "kms:updatecustomkeystore",
    "kms:updatekeydescription",
    "kms:updateprimaryregion",
    "kms:verify",
    "kms:verifymac",
    "s3:createbucket",
    "s3:deletebucket",
    "s3:deleteobject",
    "s3:getbuckettagging",
    "s3:getobject",
    "s3:getobjecttagging",
    "s3:listbucket",
    "s3:putbuckettagging",
    "s3:putobject",
    "s3:putobjecttagging",
    "secretsmanager:getsecretvalue",
    "secretsmanager:tagresource",
    "secretsmanager:untagresource",
    "sts:assumerole",
    "sts:getcalleridentity",
    "sts:setsourceidentity",
    "sts:tagsession",
    "tag:getresources",
    "tag:gettagkeys",
    "tag:gettagvalues",
    "tag:tagresources",
    "tag:untagresources",
];

// Every known action has a bit, and a number that fits a byte.
const _: () = assert!(KNOWN.len() <= ActionSet::CAPACITY && KNOWN.len() <= u8::MAX as usize);

/// A set of known actions, by number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActionSet([u64; 2]);

impl ActionSet {
    /// How many actions can be known.
    pub const CAPACITY: usize = 128;

    const ALL: ActionSet = ActionSet([u64::MAX; 2]);

    /// Every known action: the bits below `KNOWN.len()`.
    const KNOWN: ActionSet = {
        let n = KNOWN.len();
        let low = if n >= 64 { u64::MAX } else { (1 << n) - 1 };
        let high = if n <= 64 {
            0
        } else if n >= 128 {
            u64::MAX
        } else {
            (1 << (n - 64)) - 1
        };
        ActionSet([low, high])
    };

    fn insert(&mut self, id: usize) {
        if let Some(word) = self.0.get_mut(id / 64) {
            *word |= 1 << (id % 64);
        }
    }

    /// Is the known action `id` in the set?
    #[inline]
    pub fn contains(&self, id: KnownAction) -> bool {
        let id = usize::from(id.0);
        self.0.get(id / 64).is_some_and(|word| word & (1 << (id % 64)) != 0)
    }

    fn complement(self) -> ActionSet {
        ActionSet([!self.0[0], !self.0[1]])
    }

    /// The known actions `patterns` match (before any `NotAction`).
    fn matched_by(patterns: &[Pattern]) -> ActionSet {
        let mut set = ActionSet::default();
        for p in patterns {
            match p.literal() {
                Some(Literal::Any) => return ActionSet::ALL,
                Some(Literal::Exact(text)) => {
                    if let Ok(id) = KNOWN.binary_search(&text) {
                        set.insert(id);
                    }
                }
                Some(Literal::Prefix(head)) => {
                    // The known actions that start with `head`: one run of
                    // the sorted list.
                    let from = KNOWN.partition_point(|a| *a < head);
                    for (id, _) in KNOWN.iter().enumerate().skip(from).take_while(|(_, a)| a.starts_with(head)) {
                        set.insert(id);
                    }
                }
                None => {
                    for (id, action) in KNOWN.iter().enumerate() {
                        if p.matches(action, &pattern::NoValues) {
                            set.insert(id);
                        }
                    }
                }
            }
        }
        set
    }

    /// The known actions an `Action` / `NotAction` element covers.
    pub fn covered_by(actions: &Actions) -> ActionSet {
        // The lookup table is built with the first policy, not in the
        // first decision that needs it.
        LazyLock::force(&BY_HASH);
        let matched = ActionSet::matched_by(&actions.patterns);
        // The bits past the known actions stay clear either way.
        if actions.negated {
            matched.complement().intersect_known()
        } else {
            matched.intersect_known()
        }
    }

    fn intersect_known(self) -> ActionSet {
        ActionSet([self.0[0] & ActionSet::KNOWN.0[0], self.0[1] & ActionSet::KNOWN.0[1]])
    }
}

/// A known action's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownAction(u8);

/// The known actions by the hash of their text (the action index's hash,
/// which a request's [`super::ActionKey`] computes once).
static BY_HASH: LazyLock<HashTable<(&'static str, u8)>> = LazyLock::new(|| {
    let mut table = HashTable::with_capacity(KNOWN.len());
    for (id, action) in KNOWN.iter().enumerate() {
        let id = u8::try_from(id).unwrap_or(u8::MAX);
        table.insert_unique(super::action_hash(action), (*action, id), |(a, _)| super::action_hash(a));
    }
    table
});

/// The number of `lower` (a lowercased action whose action-index hash is
/// `hash`), when it is a known action.
pub fn known(lower: &str, hash: u64) -> Option<KnownAction> {
    BY_HASH.find(hash, |(a, _)| pattern::same_bytes(a.as_bytes(), lower.as_bytes())).map(|(_, id)| KnownAction(*id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, PolicyKind};

    #[test]
    fn the_list_is_sorted_lowercase_and_fits() {
        assert!(KNOWN.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        for a in KNOWN {
            assert_eq!(*a, a.to_ascii_lowercase());
            assert!(a.split_once(':').is_some_and(|(s, n)| !s.is_empty() && !n.is_empty()), "{a}");
            assert_eq!(known(a, super::super::action_hash(a)).map(|k| KNOWN[usize::from(k.0)]), Some(*a));
        }
        assert_eq!(known("kms:nosuchaction", super::super::action_hash("kms:nosuchaction")), None);
        let mut every = ActionSet::default();
        (0..KNOWN.len()).for_each(|id| every.insert(id));
        assert_eq!(ActionSet::KNOWN, every, "the mask holds exactly the known actions");
    }

    #[test]
    fn sets_agree_with_the_patterns() {
        let elements = [
            r#""*""#,
            r#""kms:*""#,
            r#""KMS:Decrypt""#,
            r#""kms:Generate*""#,
            r#"["kms:Describe*", "kms:List*", "kms:Get*"]"#,
            r#""kms:*Key""#,
            r#""k?s:Re*""#,
            r#""*:tag*""#,
            r#"["iam:Tag*", "iam:UntagRole", "sts:AssumeRole"]"#,
            r#""s3:Get*Tagging""#,
            r#""tag:*""#,
            r#""kms:Decrypt?""#,
            r#""nosuch:*""#,
            r#""kms:sign""#,
        ];
        for element in elements {
            for field in ["Action", "NotAction"] {
                let doc = format!(
                    r#"{{"Version": "2012-10-17", "Statement": [{{"Effect": "Allow", "{field}": {element}, "Resource": "*"}}]}}"#
                );
                let policy = Policy::from_json(&doc, PolicyKind::Identity).unwrap();
                let st = &policy.statements()[0];
                let set = ActionSet::covered_by(&st.actions);
                for (id, action) in KNOWN.iter().enumerate() {
                    let id = KnownAction(u8::try_from(id).unwrap());
                    assert_eq!(set.contains(id), st.covers_action(action), "{field} {element} on {action}");
                }
            }
        }
    }
}
