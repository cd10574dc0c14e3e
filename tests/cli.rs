//! `tagward test` as a user runs it: the real binary, its output and exit
//! codes (docs/scenarios.md: 0 all passed, 1 a step failed, 2 a file could not be
//! loaded).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::path::{Path, PathBuf};
use std::process::Command;

fn tagward(args: &[&Path]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tagward")).arg("test").args(args).output().expect("run tagward");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tagward-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    file
}

const WORLD: &str = r#"
  "policies": {"Alpha": {"Version": "2012-10-17", "Statement": [{"Sid": "UseAlphaKeys", "Effect": "Allow",
      "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"aws:ResourceTag/Project": "Alpha"}}}]}},
  "principals": [{"arn": "arn:aws:iam::111122223333:role/Dev", "policies": ["Alpha"]}],
  "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "tags": {"Project": "Alpha"}}]"#;

#[test]
fn passing_file_exits_zero_with_the_closing_line() {
    let file = scratch(
        "pass.json",
        &format!(
            r#"{{{WORLD}, "steps": [
      {{"authorize": {{"principal": "arn:aws:iam::111122223333:role/Dev", "action": "kms:Decrypt",
        "resource": "arn:aws:kms:us-east-1:111122223333:key/k1"}}, "expect": {{"decision": "Allow", "matched": ["UseAlphaKeys", "Enable IAM User Permissions"]}}}}]}}"#
        ),
    );
    let (code, out, err) = tagward(&[&file]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "1 passed, 0 failed");
}

#[test]
fn failing_step_names_file_step_expected_and_got() {
    let file = scratch(
        "fail.yaml",
        r#"
policies:
  Alpha:
    Version: "2012-10-17"
    Statement:
      - Sid: UseAlphaKeys
        Effect: Allow
        Action: kms:Decrypt
        Resource: "*"
principals:
  - arn: arn:aws:iam::111122223333:role/Dev
    policies: [Alpha]
resources:
  - arn: arn:aws:kms:us-east-1:111122223333:key/k1
steps:
  - name: should be denied
    authorize: {principal: "arn:aws:iam::111122223333:role/Dev", action: "kms:Decrypt", resource: "arn:aws:kms:us-east-1:111122223333:key/k1"}
    expect: {decision: Deny}
  - authorize: {principal: "arn:aws:iam::111122223333:role/Dev", action: "kms:Encrypt", resource: "arn:aws:kms:us-east-1:111122223333:key/k1"}
    expect: {decision: Deny, reason: ImplicitDeny}
"#,
    );
    let (code, out, _) = tagward(&[&file]);
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains(
            "fail.yaml: steps[0] \"should be denied\": expected Deny, got Allow (Allowed) decided by Alpha[0] \"UseAlphaKeys\""
        ),
        "{out}"
    );
    assert_eq!(lines[1], "1 passed, 1 failed");
}

#[test]
fn broken_policy_is_a_load_error_that_says_what_to_fix() {
    let file = scratch(
        "broken.json",
        r#"{"policies": {"Alpha": {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*"},
        {"Effect": "Permit", "Action": "kms:Decrypt", "Resource": "*"}]}}, "steps": []}"#,
    );
    let (code, out, err) = tagward(&[&file]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(r#"broken.json: policies.Alpha.Statement[1].Effect: expected "Allow" or "Deny", found "Permit""#),
        "{err}"
    );
    assert_eq!(out.trim(), "0 passed, 0 failed");
}

#[test]
fn missing_path_and_bad_json_are_load_errors() {
    let (code, _, err) = tagward(&[Path::new("/nonexistent/scenarios")]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/scenarios: no such file or directory"), "{err}");
    let file = scratch("syntax.json", "{\"steps\": [}");
    let (code, _, err) = tagward(&[&file]);
    assert_eq!(code, 2);
    assert!(err.contains("syntax.json: not valid JSON"), "{err}");
}
