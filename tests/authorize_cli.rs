//! `tagward authorize` as a user runs it: the real binary against a sidecar
//! on loopback, every flag, the JSON output and the exit codes (0 allow,
//! 1 deny, 2 the question could not be asked or answered).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::process::Command;

use common::*;

/// Runs `tagward authorize ARGS` with `TAGWARD_ADDR` set to `addr`.
fn ask(addr: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tagward"))
        .arg("authorize")
        .args(args)
        .env("TAGWARD_ADDR", addr)
        .output()
        .expect("run tagward authorize");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn authorize_flags_exit_codes_and_json() {
    let running = start(config()).await;
    let addr = running.data_addr.to_string();
    let run = |args: Vec<&'static str>| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || ask(&addr, &args))
    };

    // Allow: exit 0, the text answer with the deciding statements.
    let (code, out, err) = run(vec!["--principal", ALPHA_APP, "--action", "kms:Decrypt", "--resource", KEY_ALPHA]).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("Allow (ALLOWED) at revision "), "{out}");
    assert!(out.contains("AlphaKeys[0] \"UseKeysOfMyProject\""), "{out}");

    // Deny: exit 1; --json gives one object.
    let (code, out, err) =
        run(vec!["--json", "--principal", BETA_APP, "--action", "kms:Decrypt", "--resource", KEY_ALPHA]).await.unwrap();
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["decision"], "Deny");
    assert_eq!(v["reason"], "IMPLICIT_DENY");
    assert!(v["revision"].as_u64().is_some_and(|r| r > 0), "{v}");

    // --session-tag on a session: its tag decides.
    let session = "arn:aws:sts::111122223333:assumed-role/BetaApp/build-1";
    let (code, out, err) =
        run(vec!["--principal", session, "--action", "kms:Decrypt", "--resource", KEY_ALPHA, "--session-tag", "project=Alpha"])
            .await
            .unwrap();
    assert_eq!(code, 0, "the session tag overrides the role's project tag: {out}{err}");

    // --tag-key sets aws:TagKeys: KeyAdmin may tag Project but not Owner.
    let tagging = |key: &'static str| {
        vec!["--json", "--principal", KEY_ADMIN, "--action", "kms:TagResource", "--resource", KEY_ALPHA, "--tag-key", key]
    };
    assert_eq!(run(tagging("Project")).await.unwrap().0, 0);
    assert_eq!(run(tagging("Owner")).await.unwrap().0, 1);
    // --request-tag derives aws:TagKeys from its keys.
    let (code, ..) =
        run(vec!["--principal", KEY_ADMIN, "--action", "kms:TagResource", "--resource", KEY_ALPHA, "--request-tag", "Owner=ops"])
            .await
            .unwrap();
    assert_eq!(code, 1);

    // --context reaches the sidecar: a key Tagward fills in itself is refused
    // there, naming the field, and the command exits 2.
    let (code, out, err) = run(vec![
        "--principal",
        ALPHA_APP,
        "--action",
        "kms:Decrypt",
        "--resource",
        KEY_ALPHA,
        "--context",
        "aws:ResourceTag/Project=Alpha",
    ])
    .await
    .unwrap();
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("InvalidArgument") && err.contains("ValidationException"), "{err}");
    assert!(err.contains("context[\"aws:ResourceTag/Project\"]"), "{err}");
    // A malformed flag is refused before anything is sent.
    let (code, _, err) =
        run(vec!["--principal", ALPHA_APP, "--action", "kms:Decrypt", "--resource", KEY_ALPHA, "--context", "novalue"])
            .await
            .unwrap();
    assert_eq!(code, 2);
    assert!(err.contains("--context \"novalue\": expected KEY=VALUE"), "{err}");

    // --min-revision beyond the sidecar's revision: DEADLINE_EXCEEDED, exit 2.
    let (code, _, err) =
        run(vec!["--principal", ALPHA_APP, "--action", "kms:Decrypt", "--resource", KEY_ALPHA, "--min-revision", "999999"])
            .await
            .unwrap();
    assert_eq!(code, 2);
    assert!(err.contains("DeadlineExceeded"), "{err}");

    // Nothing listening: exit 2.
    running.shutdown().await;
    let (code, _, err) = run(vec!["--principal", ALPHA_APP, "--action", "kms:Decrypt", "--resource", KEY_ALPHA]).await.unwrap();
    assert_eq!(code, 2, "{err}");
}
