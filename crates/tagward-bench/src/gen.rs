//! A seeded world and request-mix generator for benchmarks and load tests
//! (`tagward-bench gen-world`, `tagward-bench load`, `benches/`).
//!
//! Every entity is a pure function of the seed and its index (a SplitMix64
//! hash, no shared random stream), so the same [`GenSpec`] always gives the
//! same world and the same requests, a world of a million keys can be
//! streamed to a file or into a [`State`] without holding its description in
//! memory, and the request mix can find a key of a given project by probing
//! indices.
//!
//! The policies follow the seed documents' styles: ABAC on
//! `aws:ResourceTag/Project` = `${aws:PrincipalTag/project}`, an explicit
//! deny on `Type=Reserved`, `aws:TagKeys` limits on tag writes, `NotAction`,
//! action and ARN wildcards, `StringLike`, literal tag values.
//!
//! Every world also holds a probe principal and [`PROBE_KEYS`] probe keys
//! (see [`probe_key`]): `tagward load` flips a probe key's `Project` tag
//! through the admin stream and times how soon Authorize reflects it.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::{json, Value};

use tagward_core::engine::Request;
use tagward_core::state::State;
use tagward_core::world::{PrincipalSpec, ResourceSpec, WorldBuilder, WorldError, WorldSpec};

/// The account every generated entity lives in.
pub const ACCOUNT: &str = "111122223333";
/// The principal the visibility probe asks as (tag `project=probe`).
pub const PROBE_PRINCIPAL: &str = "arn:aws:iam::111122223333:role/tagward-probe";
/// The managed policy the probe principal attaches.
pub const PROBE_POLICY: &str = "tagward-probe";
/// The action the probe asks for.
pub const PROBE_ACTION: &str = "kms:Decrypt";
/// How many probe keys a world holds.
pub const PROBE_KEYS: usize = 16;
/// The probe keys' `Project` value when the probe principal may use them.
pub const PROBE_ON: &str = "probe";
/// ... and when it may not (the generated worlds start so).
pub const PROBE_OFF: &str = "probe-off";

const REGIONS: [&str; 3] = ["us-east-1", "us-west-2", "eu-west-1"];
const CRYPTO: [&str; 6] =
    ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyPair", "kms:ReEncryptFrom", "kms:Decrypt"];
const READS: [&str; 5] = ["kms:DescribeKey", "kms:ListResourceTags", "kms:Sign", "kms:GetPublicKey", "kms:ScheduleKeyDeletion"];
const S3: [&str; 3] = ["s3:ListBucket", "s3:GetBucketTagging", "s3:DeleteBucket"];
const TEAMS: u64 = 20;

/// Every action a generated request may name, for translations that need
/// concrete action lists (Cedar has no action wildcards).
pub const ACTIONS: [&str; 16] = [
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyPair",
    "kms:ReEncryptFrom",
    "kms:DescribeKey",
    "kms:ListResourceTags",
    "kms:Sign",
    "kms:GetPublicKey",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
    "s3:ListBucket",
    "s3:GetBucketTagging",
    "s3:DeleteBucket",
    "kms:Verify",
];

/// The styles of generated managed policies, in the order policy `i`
/// cycles through them. The Cedar bench translates each style by hand and
/// matches on this enum, so a new style cannot go untranslated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyStyle {
    /// Crypto actions on keys whose `Project` is the principal's `project`.
    CryptoOnOwnProject,
    /// Deny everything on `Type=Reserved`; allow reads everywhere.
    DenyReservedReadKeys,
    /// Tag writes limited by `aws:TagKeys` and `aws:RequestTag/Project`;
    /// never a `Type` tag.
    TagOwnProject,
    /// `NotAction` on `kms:*` and `iam:*`, own project.
    EverythingButKmsAndIam,
    /// Sign and verify in `us-*` regions, `Owner` like `team-1*`.
    SignInUsRegions,
    /// Decrypt on one literal project for one literal team.
    DecryptOneProject,
}

impl PolicyStyle {
    pub const ALL: [PolicyStyle; 6] = [
        PolicyStyle::CryptoOnOwnProject,
        PolicyStyle::DenyReservedReadKeys,
        PolicyStyle::TagOwnProject,
        PolicyStyle::EverythingButKmsAndIam,
        PolicyStyle::SignInUsRegions,
        PolicyStyle::DecryptOneProject,
    ];
}

/// The size and shape of a generated world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenSpec {
    pub seed: u64,
    /// KMS keys.
    pub keys: usize,
    /// Other resources (S3 buckets).
    pub other_resources: usize,
    /// Tags on every key and bucket (Project, Type, Owner, then fillers).
    pub tags: usize,
    /// Roles (besides the probe principal).
    pub principals: usize,
    /// Managed policies (besides the probe's).
    pub policies: usize,
    /// Managed policies each role attaches (IAM's default quota is 10).
    pub attach: usize,
    /// Distinct `Project` values.
    pub projects: usize,
}

impl Default for GenSpec {
    fn default() -> GenSpec {
        GenSpec {
            seed: 1,
            keys: 10_000,
            other_resources: 1_000,
            tags: 10,
            principals: 100,
            policies: 1_000,
            attach: 10,
            projects: 50,
        }
    }
}

/// One request of the mix, with what kind of request it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MixItem {
    /// `same-project`, `other-project`, `tag-write`, `bucket`, `read`,
    /// `unknown-resource` or `unknown-principal`.
    pub kind: &'static str,
    pub request: Request,
}

/// SplitMix64 of a seed, a stream and an index.
fn hash(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..2 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

/// A small deterministic stream, for the choices inside one item.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = hash(self.0, 0x5EED, 1);
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const S_KEY: u64 = 1;
const S_BUCKET: u64 = 2;
const S_PRINCIPAL: u64 = 3;
const S_MIX: u64 = 4;
const S_BATCH: u64 = 5;

/// The ARN of probe key `i` (`i < PROBE_KEYS`).
pub fn probe_key(i: usize) -> String {
    format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/ffffffff-0000-4000-8000-{i:012x}")
}

/// The probe principal's policy: crypto on keys of its own project.
pub fn probe_policy() -> Value {
    json!({"Version": "2012-10-17", "Statement": [{
        "Sid": "ProbeOwnProject", "Effect": "Allow", "Action": PROBE_ACTION,
        "Resource": format!("arn:aws:kms:*:{ACCOUNT}:key/*"),
        "Condition": {"StringEquals": {"aws:ResourceTag/Project": "${aws:PrincipalTag/project}"}}}]})
}

impl GenSpec {
    fn project(&self, h: u64) -> String {
        format!("p{}", h % self.projects.max(1) as u64)
    }

    /// The name of managed policy `i`.
    pub fn policy_name(&self, i: usize) -> String {
        format!("abac-{i:05}")
    }

    /// The style of managed policy `i`.
    pub fn policy_style(&self, i: usize) -> PolicyStyle {
        PolicyStyle::ALL[i % PolicyStyle::ALL.len()]
    }

    /// The literal `Project` value of policy `i` ([`PolicyStyle::DecryptOneProject`]).
    pub fn policy_project(&self, i: usize) -> String {
        format!("p{}", i % self.projects.max(1))
    }

    /// The literal `team` value of policy `i` ([`PolicyStyle::DecryptOneProject`]).
    pub fn policy_team(&self, i: usize) -> String {
        format!("team-{}", i as u64 % TEAMS)
    }

    /// Managed policy `i`, in the style [`GenSpec::policy_style`] gives.
    pub fn policy(&self, i: usize) -> Value {
        let keys = format!("arn:aws:kms:*:{ACCOUNT}:key/*");
        let project = self.policy_project(i);
        let team = self.policy_team(i);
        let statements = match self.policy_style(i) {
            PolicyStyle::CryptoOnOwnProject => json!([{
                "Sid": "CryptoOnOwnProject", "Effect": "Allow",
                "Action": ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"],
                "Resource": keys,
                "Condition": {"StringEquals": {"aws:ResourceTag/Project": "${aws:PrincipalTag/project}"}}}]),
            PolicyStyle::DenyReservedReadKeys => json!([
                {"Sid": "DenyReserved", "Effect": "Deny", "Action": "kms:*", "Resource": "*",
                 "Condition": {"StringEquals": {"aws:ResourceTag/Type": "Reserved"}}},
                {"Sid": "ReadKeys", "Effect": "Allow", "Action": ["kms:Describe*", "kms:List*", "kms:Get*"], "Resource": "*"}]),
            PolicyStyle::TagOwnProject => json!([
                {"Sid": "TagOwnProject", "Effect": "Allow", "Action": ["kms:TagResource", "kms:UntagResource"], "Resource": keys,
                 "Condition": {"ForAllValues:StringEquals": {"aws:TagKeys": ["Project", "Owner"]},
                               "StringEquals": {"aws:RequestTag/Project": "${aws:PrincipalTag/project}"}}},
                {"Sid": "NeverRetype", "Effect": "Deny", "Action": ["kms:TagResource", "kms:UntagResource"], "Resource": "*",
                 "Condition": {"ForAnyValue:StringEquals": {"aws:TagKeys": ["Type"]}}}]),
            PolicyStyle::EverythingButKmsAndIam => json!([{
                "Sid": "EverythingButKmsAndIam", "Effect": "Allow", "NotAction": ["kms:*", "iam:*"], "Resource": "*",
                "Condition": {"StringEquals": {"aws:ResourceTag/Project": "${aws:PrincipalTag/project}"}}}]),
            PolicyStyle::SignInUsRegions => json!([{
                "Sid": "SignInUsRegions", "Effect": "Allow", "Action": ["kms:Sign", "kms:Verify"],
                "Resource": format!("arn:aws:kms:us-*:{ACCOUNT}:key/*"),
                "Condition": {"StringLike": {"aws:ResourceTag/Owner": "team-1*"}}}]),
            PolicyStyle::DecryptOneProject => json!([{
                "Sid": "DecryptOneProject", "Effect": "Allow", "Action": "kms:Decrypt", "Resource": keys,
                "Condition": {"StringEquals": {"aws:ResourceTag/Project": project, "aws:PrincipalTag/team": team}}}]),
        };
        json!({"Version": "2012-10-17", "Statement": statements})
    }

    /// The ARN of role `p`.
    pub fn principal_arn(&self, p: usize) -> String {
        format!("arn:aws:iam::{ACCOUNT}:role/app-{p:06}")
    }

    /// Role `p`: `project` and `team` tags, `attach` distinct policies.
    pub fn principal(&self, p: usize) -> PrincipalSpec {
        let h = hash(self.seed, S_PRINCIPAL, p as u64);
        let mut draw = Draw(h);
        let want = self.attach.min(self.policies);
        let mut policies: Vec<String> = Vec::with_capacity(want);
        while policies.len() < want {
            let name = self.policy_name(draw.below(self.policies));
            if !policies.contains(&name) {
                policies.push(name);
            }
        }
        PrincipalSpec {
            arn: self.principal_arn(p),
            tags: [("project".to_string(), self.project(h)), ("team".to_string(), format!("team-{}", (h >> 20) % TEAMS))]
                .into_iter()
                .collect(),
            policies,
            pending_policies: Vec::new(),
            inline_policies: Default::default(),
            ..PrincipalSpec::default()
        }
    }

    fn tags_of(&self, h: u64) -> std::collections::BTreeMap<String, String> {
        let mut draw = Draw(h);
        let mut tags = std::collections::BTreeMap::new();
        let base = [
            ("Project", self.project(h)),
            ("Type", if (h >> 8).is_multiple_of(10) { "Reserved" } else { "General" }.to_string()),
            ("Owner", format!("team-{}", (h >> 16) % TEAMS)),
        ];
        for (k, v) in base.into_iter().take(self.tags) {
            tags.insert(k.to_string(), v);
        }
        for j in 3..self.tags {
            tags.insert(format!("Tag{j:02}"), format!("value-{}", draw.below(100)));
        }
        tags
    }

    /// The ARN of key `k`.
    pub fn key_arn(&self, k: usize) -> String {
        let h = hash(self.seed, S_KEY, k as u64);
        format!(
            "arn:aws:kms:{}:{ACCOUNT}:key/{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            REGIONS[(h % 3) as usize],
            k as u32,
            (h >> 48) & 0xffff,
            (h >> 36) & 0xfff,
            (h >> 24) & 0xfff,
            h & 0xffff_ffff_ffff
        )
    }

    fn key_project(&self, k: usize) -> String {
        self.project(hash(self.seed, S_KEY, k as u64))
    }

    /// Key `k` with its tags (default key policy: delegates to IAM).
    pub fn key(&self, k: usize) -> ResourceSpec {
        ResourceSpec { arn: self.key_arn(k), tags: self.tags_of(hash(self.seed, S_KEY, k as u64)), ..Default::default() }
    }

    /// The ARN of bucket `b`.
    pub fn bucket_arn(&self, b: usize) -> String {
        format!("arn:aws:s3:::tagward-bucket-{b:07}-{:04x}", hash(self.seed, S_BUCKET, b as u64) & 0xffff)
    }

    /// Bucket `b` with its tags.
    pub fn bucket(&self, b: usize) -> ResourceSpec {
        ResourceSpec { arn: self.bucket_arn(b), tags: self.tags_of(hash(self.seed, S_BUCKET, b as u64)), ..Default::default() }
    }

    fn probe_principal(&self) -> PrincipalSpec {
        PrincipalSpec {
            arn: PROBE_PRINCIPAL.to_string(),
            tags: [("project".to_string(), PROBE_ON.to_string())].into_iter().collect(),
            policies: vec![PROBE_POLICY.to_string()],
            pending_policies: Vec::new(),
            inline_policies: Default::default(),
            ..PrincipalSpec::default()
        }
    }

    fn probe_resource(&self, i: usize) -> ResourceSpec {
        ResourceSpec {
            arn: probe_key(i),
            tags: [("Project".to_string(), PROBE_OFF.to_string()), ("Type".to_string(), "General".to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    /// Every policy, by name (the probe's included).
    pub fn policies(&self) -> impl Iterator<Item = (String, Value)> + '_ {
        (0..self.policies)
            .map(|i| (self.policy_name(i), self.policy(i)))
            .chain(std::iter::once((PROBE_POLICY.to_string(), probe_policy())))
    }

    /// Every principal (the probe's last).
    pub fn principals(&self) -> impl Iterator<Item = PrincipalSpec> + '_ {
        (0..self.principals).map(|p| self.principal(p)).chain(std::iter::once(self.probe_principal()))
    }

    /// Every resource: keys, buckets, then the probe keys.
    pub fn resources(&self) -> impl Iterator<Item = ResourceSpec> + '_ {
        (0..self.keys)
            .map(|k| self.key(k))
            .chain((0..self.other_resources).map(|b| self.bucket(b)))
            .chain((0..PROBE_KEYS).map(|i| self.probe_resource(i)))
    }

    /// The whole world as a world-file value (hold it in memory only for
    /// modest sizes; [`GenSpec::write_world`] and [`GenSpec::build_state`]
    /// stream).
    pub fn world(&self) -> WorldSpec {
        WorldSpec {
            policies: self.policies().collect(),
            principals: self.principals().collect(),
            resources: self.resources().collect(),
            ..WorldSpec::default()
        }
    }

    /// Writes the world file (JSON) one entity at a time.
    pub fn write_world(&self, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(b"{\n\"policies\": {")?;
        for (i, (name, doc)) in self.policies().enumerate() {
            out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
            serde_json::to_writer(&mut *out, &name)?;
            out.write_all(b": ")?;
            serde_json::to_writer(&mut *out, &doc)?;
        }
        out.write_all(b"\n},\n\"principals\": [")?;
        for (i, p) in self.principals().enumerate() {
            out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
            serde_json::to_writer(&mut *out, &p)?;
        }
        out.write_all(b"\n],\n\"resources\": [")?;
        for (i, r) in self.resources().enumerate() {
            out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
            serde_json::to_writer(&mut *out, &r)?;
        }
        out.write_all(b"\n]\n}\n")
    }

    /// Builds the state directly, one entity at a time (what a world file
    /// with this content would give, without its text in memory).
    pub fn build_state(&self) -> Result<State, WorldError> {
        let mut state = State::default();
        state.bulk(|state| {
            self.add_policies(state)?;
            self.add_resources(state)
        })?;
        Ok(state)
    }

    /// Adds (or replaces) the policies and principals.
    pub fn add_policies(&self, state: &mut State) -> Result<(), WorldError> {
        // The generator's ARNs are unique; not remembering them keeps a
        // million-key world's build from holding a second copy of each.
        let mut builder = WorldBuilder::new(state).trusting_unique_arns();
        for (name, doc) in self.policies() {
            builder.policy(&name, &doc)?;
        }
        for spec in self.principals() {
            builder.principal(&spec)?;
        }
        Ok(())
    }

    /// Adds the resources.
    pub fn add_resources(&self, state: &mut State) -> Result<(), WorldError> {
        let mut builder = WorldBuilder::new(state).trusting_unique_arns();
        for spec in self.resources() {
            builder.resource(&spec)?;
        }
        Ok(())
    }

    /// A key of `project`, found by probing indices (any key after 256 misses).
    fn key_of_project(&self, draw: &mut Draw, project: &str) -> usize {
        let mut k = draw.below(self.keys);
        for _ in 0..256 {
            if self.key_project(k) == project {
                break;
            }
            k = draw.below(self.keys);
        }
        k
    }

    /// Request `i` of the mix, for `principal` (or one drawn).
    fn item(&self, stream: u64, i: usize, principal: Option<usize>) -> MixItem {
        let mut draw = Draw(hash(self.seed, stream, i as u64));
        let p = principal.unwrap_or_else(|| draw.below(self.principals));
        let spec = self.principal(p);
        let my_project = spec.tags.get("project").cloned().unwrap_or_default();
        let mut request = Request { principal: spec.arn, ..Request::default() };
        let roll = draw.below(100);
        let kind = if self.keys == 0 || (self.other_resources > 0 && (75..85).contains(&roll)) {
            request.action = S3[draw.below(S3.len())].to_string();
            request.resource = self.bucket_arn(draw.below(self.other_resources.max(1)));
            "bucket"
        } else if roll < 45 {
            request.action = CRYPTO[draw.below(CRYPTO.len())].to_string();
            request.resource = self.key_arn(self.key_of_project(&mut draw, &my_project));
            "same-project"
        } else if roll < 65 {
            request.action = CRYPTO[draw.below(CRYPTO.len())].to_string();
            request.resource = self.key_arn(draw.below(self.keys));
            "other-project"
        } else if roll < 75 {
            request.action = if draw.below(4) == 0 { "kms:UntagResource" } else { "kms:TagResource" }.to_string();
            let k = if draw.below(2) == 0 { self.key_of_project(&mut draw, &my_project) } else { draw.below(self.keys) };
            request.resource = self.key_arn(k);
            let project = if draw.below(3) == 0 { self.project(draw.next()) } else { my_project.clone() };
            request.request_tags.push(("Project".into(), project));
            match draw.below(4) {
                0 => request.request_tags.push(("Type".into(), "General".into())),
                1 => request.request_tags.push(("Owner".into(), format!("team-{}", draw.below(TEAMS as usize)))),
                _ => {}
            }
            request.derive_tag_keys();
            "tag-write"
        } else if roll < 90 {
            request.action = READS[draw.below(READS.len())].to_string();
            request.resource = self.key_arn(draw.below(self.keys));
            "read"
        } else if roll < 95 {
            request.action = CRYPTO[draw.below(CRYPTO.len())].to_string();
            request.resource =
                format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-dead-4000-8000-{:012x}", draw.next() & 0xffff_ffff_ffff);
            "unknown-resource"
        } else {
            request.principal = format!("arn:aws:iam::{ACCOUNT}:role/unknown-{:06}", draw.below(1_000_000));
            request.action = CRYPTO[draw.below(CRYPTO.len())].to_string();
            request.resource = self.key_arn(draw.below(self.keys));
            "unknown-principal"
        };
        MixItem { kind, request }
    }

    /// `n` requests: about 45% on a key of the caller's project (mostly
    /// allowed), 20% on another project's key, 10% tag writes with request
    /// tags, 10% on buckets, 5% reads (wildcard actions, some never
    /// allowed), 5% on unknown keys and 5% from unknown principals.
    pub fn mix(&self, n: usize) -> Vec<MixItem> {
        (0..n).map(|i| self.item(S_MIX, i, None)).collect()
    }

    /// `n` batches of `size` items, each batch from one principal.
    pub fn batches(&self, n: usize, size: usize) -> Vec<(String, Vec<MixItem>)> {
        (0..n)
            .map(|b| {
                let p = Draw(hash(self.seed, S_BATCH, b as u64)).below(self.principals);
                let items: Vec<MixItem> = (0..size).map(|j| self.item(S_BATCH + 1 + b as u64, j, Some(p))).collect();
                (self.principal_arn(p), items)
            })
            .collect()
    }
}

fn tags_json(tags: &[(String, String)]) -> Value {
    Value::Array(tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect())
}

/// A request as the JSON form of `tagward.v1.AuthorizeRequest` (what ghz's
/// data files hold and `tagward load --data` reads).
pub fn authorize_json(r: &Request) -> Value {
    let mut v = json!({"principal": r.principal, "action": r.action, "resource": r.resource});
    if !r.request_tags.is_empty() {
        v["request_tags"] = tags_json(&r.request_tags);
    }
    if let Some(keys) = &r.tag_keys {
        v["tag_keys"] = json!({"values": keys});
    }
    if !r.session_tags.is_empty() {
        v["session_tags"] = tags_json(&r.session_tags);
    }
    v
}

/// A batch as the JSON form of `tagward.v1.BatchAuthorizeRequest`.
pub fn batch_json(principal: &str, items: &[MixItem]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|m| {
            let mut v = json!({"action": m.request.action, "resource": m.request.resource});
            if !m.request.request_tags.is_empty() {
                v["request_tags"] = tags_json(&m.request.request_tags);
            }
            if let Some(keys) = &m.request.tag_keys {
                v["tag_keys"] = json!({"values": keys});
            }
            v
        })
        .collect();
    json!({"principal": principal, "items": items})
}

#[cfg(test)]
mod tests {
    use super::*;
    use tagward_core::engine::authorize;

    fn small() -> GenSpec {
        GenSpec { keys: 500, other_resources: 50, principals: 20, policies: 60, ..GenSpec::default() }
    }

    #[test]
    fn same_seed_same_world_and_mix() {
        let a = small();
        let mut text_a = Vec::new();
        let mut text_b = Vec::new();
        a.write_world(&mut text_a).unwrap();
        a.clone().write_world(&mut text_b).unwrap();
        assert_eq!(text_a, text_b);
        assert_eq!(a.mix(200), a.mix(200));
        let other = GenSpec { seed: 2, ..small() };
        assert_ne!(a.mix(50), other.mix(50));
    }

    #[test]
    fn the_streamed_file_is_the_world() {
        let spec = small();
        let mut text = Vec::new();
        spec.write_world(&mut text).unwrap();
        let parsed: WorldSpec = serde_json::from_slice(&text).unwrap();
        let state = parsed.build().unwrap();
        let direct = spec.build_state().unwrap();
        assert_eq!(state.counts(), direct.counts());
        assert_eq!(direct.counts(), (61, 21, 500 + 50 + PROBE_KEYS));
        for m in spec.mix(300) {
            let a = authorize(&state, &m.request, false).map(|d| d.reason);
            let b = authorize(&direct, &m.request, false).map(|d| d.reason);
            assert_eq!(a, b, "{m:?}");
        }
    }

    #[test]
    fn the_mix_has_allows_and_every_kind_of_deny() {
        let spec = small();
        let state = spec.build_state().unwrap();
        let mut reasons = std::collections::BTreeMap::new();
        for m in spec.mix(2000) {
            let d = authorize(&state, &m.request, false).expect("valid request");
            *reasons.entry(d.reason.as_str()).or_insert(0) += 1;
        }
        for r in ["Allowed", "ExplicitDeny", "ImplicitDeny"] {
            assert!(reasons.get(r).copied().unwrap_or(0) > 20, "{reasons:?}");
        }
    }
}
