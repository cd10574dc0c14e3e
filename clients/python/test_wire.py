#!/usr/bin/env python3
"""Wire-contract test of a real Tagward server, from Python.

    python3 test_wire.py [PATH/TO/tagward]

The binary comes from the argument, else $TAGWARD_BIN, else
../../target/debug/tagward relative to this file. The test starts it on
free loopback ports with deploy/world/example.json and an admin token,
waits for grpc.health.v1 SERVING, runs the checks below in order against
the one server (later checks see earlier changes), then stops it with
SIGTERM and expects exit code 0 within 15 s.

No pytest: plain asserts, one line per check, and `N passed, N failed` as
the last line. Exit code 0 when every check passed, else 1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402

from tagward_client import (  # noqa: E402
    TagwardClient,
    delete_endpoint,
    delete_organization,
    delete_session,
    error_info,
    pb,
    put_endpoint,
    put_organization,
    put_policy,
    put_principal,
    put_session,
    put_resource,
    remove_tags,
    set_tags,
    tag_dict,
)

ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
WORLD = os.environ.get("TAGWARD_WORLD", os.path.join(ROOT, "deploy", "world", "example.json"))
MIN_REVISION_WAIT_MS = 400

ACCOUNT = "111122223333"
ALPHA = f"arn:aws:iam::{ACCOUNT}:role/AlphaApp"
BETA = f"arn:aws:iam::{ACCOUNT}:role/BetaApp"
KEY_ADMIN = f"arn:aws:iam::{ACCOUNT}:role/KeyAdmin"
TAGGER = f"arn:aws:iam::{ACCOUNT}:role/Tagger"
NO_TAG_APP = f"arn:aws:iam::{ACCOUNT}:role/NoTagApp"
K_ALPHA = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
K_BETA = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0987dcba-09fe-87dc-65ba-ab0987654321"
K_RESERVED = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/5555eeee-0000-0000-0000-000000000005"
K_UNTAGGED = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/77777777-0000-0000-0000-000000000007"
K_MISSING = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/ffffffff-0000-0000-0000-00000000ffff"


# ------------------------------------------------------------------ harness


def free_ports(n: int) -> List[int]:
    """n distinct free loopback ports (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    """The tagward binary, running `serve` on free loopback ports."""

    def __init__(
        self,
        binary: str,
        token: str,
        *,
        args: Sequence[str] = (),
        data_scheme: str = "",
        admin_listen: Optional[str] = None,
        client: Optional[Dict[str, Any]] = None,
    ):
        """``args`` are more serve flags (TLS), ``data_scheme`` prefixes the
        data address clients use (``https://``), ``admin_listen`` replaces
        the admin port (a ``unix:///PATH``), ``client`` are the
        :class:`TagwardClient` TLS arguments the readiness probe needs."""
        self.binary = binary
        self.token = token
        self.args = list(args)
        self.data_scheme = data_scheme
        self.admin_listen = admin_listen
        self.client = client or {}
        self.proc: Optional[subprocess.Popen] = None
        self.log = tempfile.NamedTemporaryFile(prefix="tagward-wire-", suffix=".log", delete=False)
        self.data_addr = self.admin_addr = ""

    def start(self, attempts: int = 3) -> None:
        last = ""
        for _ in range(attempts):
            data_port, admin_port = free_ports(2)
            self.data_addr = f"{self.data_scheme}127.0.0.1:{data_port}"
            self.admin_addr = self.admin_listen or f"127.0.0.1:{admin_port}"
            cmd = [
                self.binary, "serve",
                "--listen", f"127.0.0.1:{data_port}",
                "--admin-listen", self.admin_addr,
                "--world", WORLD,
                "--data-dir", tempfile.mkdtemp(prefix="tagward-wire-data-"),
                f"--admin-token={self.token}",  # one argument: a token may start with '-'
                "--min-revision-wait-ms", str(MIN_REVISION_WAIT_MS),
                *self.args,
            ]
            self.log.seek(0)
            self.log.truncate()
            # Only the flags configure the server (TAGWARD_LOG* may stay).
            env = {k: v for k, v in os.environ.items() if not k.startswith("TAGWARD_") or k.startswith("TAGWARD_LOG")}
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            # Ready when health says SERVING, or failed when the process
            # ended. Wait for the port first: a gRPC channel whose first
            # connection fails backs off for a second before retrying.
            end = time.monotonic() + 20
            while time.monotonic() < end and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", data_port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.02)
            with TagwardClient(self.data_addr, **self.client) as probe:
                while time.monotonic() < end and self.proc.poll() is None:
                    try:
                        if probe.health(timeout=1.0) == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.RpcError:
                        pass
                    time.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"the server did not report SERVING within 20 s\n{self.log_tail()}")
            last = self.log_tail()
            if "cannot listen" not in last:  # not a port race: do not retry
                break
        raise RuntimeError(f"the server exited with {self.proc.returncode if self.proc else '?'}\n{last}")

    def log_tail(self, lines: int = 20) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


CHECKS: List[Tuple[str, Callable[[], None]]] = []


def check(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        CHECKS.append((name, fn))
        return fn

    return register


def expect_error(
    fn: Callable[[], object],
    code: grpc.StatusCode,
    reason: Optional[str] = None,
    prefix: Optional[str] = None,
) -> grpc.RpcError:
    """Calls fn, which must fail with `code`; `reason` is the ErrorInfo
    reason (domain "tagward"), `prefix` the start of the message."""
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()}"
        if reason is not None:
            info = error_info(e)
            assert info is not None, f"{code.name} carries no google.rpc.ErrorInfo (message: {e.details()})"
            assert info.reason == reason, f"ErrorInfo.reason {info.reason!r}, expected {reason!r} ({e.details()})"
            assert info.domain == "tagward", f"ErrorInfo.domain {info.domain!r}"
        if prefix is not None:
            assert (e.details() or "").startswith(prefix), f"message {e.details()!r} does not start with {prefix!r}"
        return e
    raise AssertionError(f"expected {code.name}{f' {reason}' if reason else ''}, the call succeeded")


def refs(matched) -> List[Tuple[str, int, str, str]]:
    return [(s.policy, s.index, s.sid, s.effect) for s in matched]


# Shared by the checks.
SRV: Server = None  # type: ignore[assignment]  # set by main()
TW: TagwardClient = None  # type: ignore[assignment]  # with the admin token; set by main()
REV = {"initial": 0}


def current_revision() -> int:
    return TW.authorize(ALPHA, "kms:Decrypt", K_ALPHA).revision


# ------------------------------------------------------------------ checks


@check("health: grpc.health.v1 SERVING for the server and tagward.v1.Authorizer/Tagging")
def _():
    SERVING = health_pb2.HealthCheckResponse.SERVING
    assert TW.health("") == SERVING
    assert TW.health("tagward.v1.Authorizer") == SERVING
    assert TW.health("tagward.v1.Tagging") == SERVING
    expect_error(lambda: TW.health("no.such.Service"), grpc.StatusCode.NOT_FOUND)


@check("reflection lists tagward.v1.Authorizer, Tagging and grpc.health.v1.Health")
def _():
    services = TW.list_services()
    for s in ("tagward.v1.Authorizer", "tagward.v1.Tagging", "grpc.health.v1.Health"):
        assert s in services, f"{s} not in {services}"


@check("reflection on each listener lists only its own services and resolves google.rpc.ErrorInfo")
def _():
    data = set(TW.list_services())
    assert "tagward.v1.Admin" not in data, f"the data listener lists Admin: {data}"
    for admin in (False, True):
        fields = TW.describe("google.rpc.ErrorInfo", admin=admin)
        assert fields == ["reason", "domain", "metadata"], fields
    assert "update" in TW.describe("tagward.v1.ApplyRequest", admin=True)


@check("Authorize allow: ALLOW/ALLOWED, the deciding Allow statements, the revision")
def _():
    r = TW.authorize(ALPHA, "kms:Decrypt", K_ALPHA)
    assert r.decision == pb.ALLOW and r.reason == pb.ALLOWED, r
    m = refs(r.matched)
    assert ("AlphaKeys", 0, "UseKeysOfMyProject", "Allow") in m, m
    assert all(e == "Allow" for *_, e in m), m
    assert r.revision > 0, r.revision
    assert not r.considered, "considered is filled without explain"
    REV["initial"] = r.revision


@check("Authorize explicit deny: DENY/EXPLICIT_DENY, matched = the applicable Deny")
def _():
    r = TW.authorize(ALPHA, "kms:Decrypt", K_RESERVED)
    assert r.decision == pb.DENY and r.reason == pb.EXPLICIT_DENY, r
    assert refs(r.matched) == [("AlphaKeys", 1, "DenyReserved", "Deny")], refs(r.matched)
    assert r.revision == REV["initial"]


@check("Authorize implicit deny: DENY/IMPLICIT_DENY, nothing matched")
def _():
    r = TW.authorize(BETA, "kms:Decrypt", K_ALPHA)
    assert r.decision == pb.DENY and r.reason == pb.IMPLICIT_DENY, r
    assert not r.matched, refs(r.matched)
    r = TW.authorize(ALPHA, "kms:Sign", K_ALPHA)
    assert r.reason == pb.IMPLICIT_DENY, r


@check("Authorize explain: every statement considered with its outcome")
def _():
    r = TW.authorize(ALPHA, "kms:Decrypt", K_ALPHA, explain=True)
    assert r.decision == pb.ALLOW
    outcomes = {(c.statement.policy, c.statement.index): c.outcome for c in r.considered}
    assert outcomes.get(("AlphaKeys", 0)) == "applies", outcomes
    assert outcomes.get(("AlphaKeys", 1)) == "condition StringEquals on aws:ResourceTag/Type does not hold", outcomes
    sids = {(c.statement.policy, c.statement.index): c.statement.sid for c in r.considered}
    assert sids[("AlphaKeys", 1)] == "DenyReserved", sids
    r = TW.authorize(ALPHA, "kms:Decrypt", K_RESERVED, explain=True)
    outcomes = {(c.statement.policy, c.statement.index): c.outcome for c in r.considered}
    assert outcomes.get(("AlphaKeys", 1)) == "applies", outcomes


@check("BatchAuthorize: one answer per item, in item order, all at one revision")
def _():
    items = [
        ("kms:Decrypt", K_RESERVED),
        ("kms:Decrypt", K_ALPHA),
        ("kms:Decrypt", K_BETA),
        ("kms:GenerateDataKeyWithoutPlaintext", K_ALPHA),
        ("kms:ScheduleKeyDeletion", K_ALPHA),
    ]
    r = TW.batch_authorize(ALPHA, items)
    got = [pb.Reason.Name(x.reason) for x in r.results]
    assert got == ["EXPLICIT_DENY", "ALLOWED", "IMPLICIT_DENY", "ALLOWED", "IMPLICIT_DENY"], got
    assert r.revision == REV["initial"], (r.revision, REV["initial"])
    assert all(x.revision == r.revision for x in r.results), [x.revision for x in r.results]
    assert refs(r.results[0].matched) == [("AlphaKeys", 1, "DenyReserved", "Deny")]
    # The reverse order gives the reverse answers.
    r2 = TW.batch_authorize(ALPHA, list(reversed(items)))
    assert [x.reason for x in r2.results] == [x.reason for x in reversed(r.results)]


@check("a repeated Authorize and BatchAuthorize (answered from the decision cache before decoding) equal the first answer")
def _():
    first = TW.authorize(ALPHA, "kms:Decrypt", K_ALPHA)
    items = [("kms:Decrypt", K_ALPHA), ("kms:Decrypt", K_RESERVED)]
    first_batch = TW.batch_authorize(ALPHA, items)
    for _ in range(3):
        again = TW.authorize(ALPHA, "kms:Decrypt", K_ALPHA)
        assert again == first, (again, first)
        assert again.SerializeToString() == first.SerializeToString()
        batch = TW.batch_authorize(ALPHA, items)
        assert batch == first_batch, (batch, first_batch)
    assert first.reason == pb.ALLOWED, first
    assert [x.reason for x in first_batch.results] == [pb.ALLOWED, pb.EXPLICIT_DENY], first_batch


@check("BatchAuthorize INVALID_ARGUMENT names the item's field (items[1].resource)")
def _():
    e = expect_error(
        lambda: TW.batch_authorize(ALPHA, [("kms:Decrypt", K_ALPHA), ("kms:Decrypt", "")]),
        grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "items[1].resource",
    )
    info = error_info(e)
    assert info.metadata.get("field") == "items[1].resource", dict(info.metadata)
    expect_error(lambda: TW.batch_authorize(ALPHA, []), grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "items")


@check("INVALID_ARGUMENT names the field: malformed principal ARN, missing action")
def _():
    e = expect_error(
        lambda: TW.authorize("not-an-arn", "kms:Decrypt", K_ALPHA),
        grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "principal",
    )
    assert error_info(e).metadata.get("field") == "principal", dict(error_info(e).metadata)
    expect_error(
        lambda: TW.authorize(ALPHA, "", K_ALPHA), grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "action"
    )
    expect_error(
        lambda: TW.list_resource_tags("arn:aws:iam::12:role", K_ALPHA),
        grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "principal",
    )


@check("Session tags only on sessions: INVALID_ARGUMENT naming session_tags for a role, not for its session")
def _():
    rev = current_revision()
    expect_error(
        lambda: TW.authorize(ALPHA, "kms:Decrypt", K_ALPHA, session_tags={"Project": "Beta"}),
        grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "session_tags",
    )
    expect_error(
        lambda: TW.tag_resource(KEY_ADMIN, K_ALPHA, {"Type": "X"}, session_tags={"team": "a"}),
        grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "session_tags",
    )
    assert current_revision() == rev
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/AlphaApp/s1"
    assert TW.authorize(session, "kms:Decrypt", K_ALPHA, session_tags={"x": "y"}).revision == rev


@check("Tag requests have no action override: the field is reserved on the wire")
def _():
    for msg in (pb.TagResourceRequest, pb.UntagResourceRequest, pb.ListResourceTagsRequest):
        assert "action" not in msg.DESCRIPTOR.fields_by_name, msg.DESCRIPTOR.full_name


@check("Admin.Apply set_tags changes the very next Authorize; ack revision = response revision")
def _():
    before = TW.authorize(ALPHA, "kms:Decrypt", K_BETA)
    assert before.reason == pb.IMPLICIT_DENY, before
    [ack] = TW.apply([set_tags(K_BETA, {"Project": "Alpha"})])
    assert not ack.HasField("error"), ack.error
    assert ack.id == "0" and ack.revision == before.revision + 1, (ack, before.revision)
    r = TW.authorize(ALPHA, "kms:Decrypt", K_BETA)  # the very next request, no min_revision
    assert r.decision == pb.ALLOW and r.revision == ack.revision, (r, ack.revision)
    r = TW.authorize(ALPHA, "kms:Decrypt", K_BETA, min_revision=ack.revision)
    assert r.decision == pb.ALLOW and r.revision == ack.revision, (r, ack.revision)
    r = TW.batch_authorize(ALPHA, [("kms:Decrypt", K_BETA)], min_revision=ack.revision)
    assert r.revision == ack.revision and r.results[0].decision == pb.ALLOW, r
    r = TW.authorize(BETA, "kms:Decrypt", K_BETA)
    assert r.reason == pb.IMPLICIT_DENY, r


@check("min_revision beyond the current revision: DEADLINE_EXCEEDED after the bounded wait")
def _():
    rev = current_revision()
    t0 = time.monotonic()
    expect_error(
        lambda: TW.authorize(ALPHA, "kms:Decrypt", K_ALPHA, min_revision=rev + 1000), grpc.StatusCode.DEADLINE_EXCEEDED
    )
    waited = time.monotonic() - t0
    assert MIN_REVISION_WAIT_MS / 1000 * 0.8 <= waited < 5, f"waited {waited:.2f}s with --min-revision-wait-ms {MIN_REVISION_WAIT_MS}"


@check("min_revision waits for a revision that comes while waiting")
def _():
    rev = current_revision()
    timer = threading.Timer(0.1, lambda: TW.apply([set_tags(K_BETA, {"Waited": "yes"})]))
    timer.start()
    try:
        r = TW.authorize(ALPHA, "kms:Decrypt", K_BETA, min_revision=rev + 1)
    finally:
        timer.join()
    assert r.revision == rev + 1, (r.revision, rev)


@check("Admin.Apply several updates on one stream: acks in order, revisions increasing")
def _():
    rev = current_revision()
    acks = TW.apply([
        set_tags(K_BETA, {"Owner": "ops"}),
        set_tags(K_BETA, {"Project": "Beta"}),
        remove_tags(K_BETA, ["Owner", "Waited"]),
    ])
    assert [a.id for a in acks] == ["0", "1", "2"], [a.id for a in acks]
    assert [a.revision for a in acks] == [rev + 1, rev + 2, rev + 3], ([a.revision for a in acks], rev)
    assert not any(a.HasField("error") for a in acks), [a.error for a in acks]
    r = TW.list_resource_tags(KEY_ADMIN, K_BETA)
    assert tag_dict(r.tags) == {"Project": "Beta", "Type": "General"}, tag_dict(r.tags)
    assert r.revision == rev + 3
    assert TW.authorize(ALPHA, "kms:Decrypt", K_BETA).reason == pb.IMPLICIT_DENY


@check("Admin.Apply malformed policy: per-update MalformedPolicyDocumentException, stream stays usable")
def _():
    rev = current_revision()
    with TW.apply_session() as s:
        a1 = s.send(put_policy("Broken", "{ not json"), id="bad-json")
        assert a1.id == "bad-json" and a1.error.code == "MalformedPolicyDocumentException", a1
        assert a1.revision == rev, (a1.revision, rev)
        assert a1.error.message, "the error has no message"
        bad_effect = {"Version": "2012-10-17", "Statement": [{"Effect": "Permit", "Action": "kms:*", "Resource": "*"}]}
        a2 = s.send(put_policy("Broken", bad_effect), id="bad-effect")
        assert a2.error.code == "MalformedPolicyDocumentException", a2
        assert "Effect" in a2.error.message, a2.error.message
        assert a2.revision == rev
        good = {
            "Version": "2012-10-17",
            "Statement": [{"Sid": "TagAnyKey", "Effect": "Allow", "Action": ["kms:TagResource", "kms:UntagResource"], "Resource": "*"}],
        }
        a3 = s.send(put_policy("TagAnything", good), id="good")
        assert not a3.HasField("error") and a3.revision == rev + 1, a3
        a4 = s.send(put_principal(TAGGER, policies=["TagAnything"]), id="tagger")
        assert not a4.HasField("error") and a4.revision == rev + 2, a4
        a5 = s.send(put_principal(NO_TAG_APP, policies=["AlphaKeys"]), id="notag")
        assert not a5.HasField("error") and a5.revision == rev + 3, a5
    # The same through apply(): the update after the refused one is applied.
    acks = TW.apply([put_policy("Broken", "[]"), set_tags(K_RESERVED, {"Note": "x"}), remove_tags(K_RESERVED, ["Note"])])
    assert acks[0].error.code == "MalformedPolicyDocumentException" and acks[0].revision == rev + 3, acks[0]
    assert not acks[1].HasField("error") and acks[1].revision == rev + 4, acks[1]
    assert not acks[2].HasField("error") and acks[2].revision == rev + 5, acks[2]
    # Refused updates are not visible.
    names = [i.update.put_policy.name for i in TW.export() if i.update.HasField("put_policy")]
    assert "Broken" not in names and "TagAnything" in names, names


@check("Authorize missing_keys: the condition key the request lacked (an untagged key)")
def _():
    [ack] = TW.apply([put_resource(K_UNTAGGED)])
    assert not ack.HasField("error"), ack.error
    r = TW.authorize(ALPHA, "kms:Decrypt", K_UNTAGGED)
    assert r.reason == pb.IMPLICIT_DENY and r.revision == ack.revision, r
    assert "aws:ResourceTag/Project" in r.missing_keys, list(r.missing_keys)
    r = TW.authorize(ALPHA, "kms:Decrypt", K_ALPHA)
    assert r.decision == pb.ALLOW and not r.missing_keys, list(r.missing_keys)


@check("TagResource as a principal: applied, revision, visible to the next Authorize; no-op keeps the revision")
def _():
    rev = current_revision()
    r = TW.tag_resource(KEY_ADMIN, K_BETA, {"Project": "Alpha"})
    assert r.changed and r.revision == rev + 1, (r, rev)
    assert tag_dict(r.tags) == {"Project": "Alpha", "Type": "General"}, tag_dict(r.tags)
    a = TW.authorize(ALPHA, "kms:Decrypt", K_BETA)
    assert a.decision == pb.ALLOW and a.revision == r.revision, (a, r.revision)
    again = TW.tag_resource(KEY_ADMIN, K_BETA, {"Project": "Alpha"})
    assert not again.changed and again.revision == r.revision, again
    u = TW.untag_resource(KEY_ADMIN, K_BETA, ["Type"])
    assert u.changed and u.revision == rev + 2 and tag_dict(u.tags) == {"Project": "Alpha"}, u
    back = TW.tag_resource(KEY_ADMIN, K_BETA, {"Project": "Beta", "Type": "General"})
    assert back.changed and back.revision == rev + 3 and tag_dict(back.tags) == {"Project": "Beta", "Type": "General"}, back
    assert TW.authorize(ALPHA, "kms:Decrypt", K_BETA).reason == pb.IMPLICIT_DENY


@check("TagResource denied: PERMISSION_DENIED with ErrorInfo AccessDeniedException, nothing changed")
def _():
    rev = current_revision()
    expect_error(
        lambda: TW.tag_resource(ALPHA, K_ALPHA, {"Project": "Beta"}),
        grpc.StatusCode.PERMISSION_DENIED, "AccessDeniedException",
    )
    # KeyAdmin may only use the keys Project and Type.
    e = expect_error(
        lambda: TW.tag_resource(KEY_ADMIN, K_ALPHA, {"Owner": "me"}),
        grpc.StatusCode.PERMISSION_DENIED, "AccessDeniedException",
    )
    assert "kms:TagResource" in e.details(), e.details()
    expect_error(
        lambda: TW.untag_resource(BETA, K_BETA, ["Project"]), grpc.StatusCode.PERMISSION_DENIED, "AccessDeniedException"
    )
    assert current_revision() == rev
    assert tag_dict(TW.list_resource_tags(KEY_ADMIN, K_ALPHA).tags) == {"Project": "Alpha", "Type": "General"}


@check("TagResource bad tag key: INVALID_ARGUMENT with ErrorInfo TagException")
def _():
    rev = current_revision()
    for key in ("bad#key", "aws:reserved", ""):
        expect_error(
            lambda: TW.tag_resource(TAGGER, K_ALPHA, {key: "v"}), grpc.StatusCode.INVALID_ARGUMENT, "TagException"
        )
    assert current_revision() == rev
    # The same principal with a good key succeeds (so the refusals were the key's).
    ok = TW.tag_resource(TAGGER, K_ALPHA, {"Owner": "team-a"})
    assert ok.changed and ok.revision == rev + 1, ok
    ok = TW.untag_resource(TAGGER, K_ALPHA, ["Owner"])
    assert ok.changed and ok.revision == rev + 2 and tag_dict(ok.tags) == {"Project": "Alpha", "Type": "General"}, ok


@check("ListResourceTags: the tags and the revision; denied; unknown resource")
def _():
    rev = current_revision()
    r = TW.list_resource_tags(KEY_ADMIN, K_RESERVED)
    assert tag_dict(r.tags) == {"Project": "Alpha", "Type": "Reserved"}, tag_dict(r.tags)
    assert r.revision == rev
    r = TW.list_resource_tags(KEY_ADMIN, K_RESERVED, min_revision=rev)
    assert r.revision == rev
    expect_error(
        lambda: TW.list_resource_tags(ALPHA, K_ALPHA), grpc.StatusCode.PERMISSION_DENIED, "AccessDeniedException"
    )
    expect_error(lambda: TW.list_resource_tags(KEY_ADMIN, K_MISSING), grpc.StatusCode.NOT_FOUND, "NotFoundException")


@check("GetResources: filters, sorted by ARN, pagination, denied, no filter")
def _():
    rev = current_revision()
    r = TW.get_resources(KEY_ADMIN, {"Project": ["Alpha"]})
    assert [x.resource for x in r.resources] == [K_ALPHA, K_RESERVED], [x.resource for x in r.resources]
    assert tag_dict(r.resources[1].tags) == {"Project": "Alpha", "Type": "Reserved"}
    assert r.next_page_token == "" and r.revision == rev, r
    # Any value of a key; several values; two filters (all must match).
    r = TW.get_resources(KEY_ADMIN, {"Type": []})
    assert [x.resource for x in r.resources] == sorted([K_ALPHA, K_BETA, K_RESERVED]), [x.resource for x in r.resources]
    r = TW.get_resources(KEY_ADMIN, {"Project": ["Beta", "Gamma"]})
    assert [x.resource for x in r.resources] == [K_BETA]
    r = TW.get_resources(KEY_ADMIN, {"Project": ["Alpha"], "Type": ["Reserved"]})
    assert [x.resource for x in r.resources] == [K_RESERVED]
    # Filter keys are exact (case-sensitive); principals are covered too
    # (ARCHITECTURE.md): the roles carry "project".
    r = TW.get_resources(KEY_ADMIN, {"project": ["Alpha"]})
    assert [x.resource for x in r.resources] == [ALPHA], [x.resource for x in r.resources]
    r = TW.get_resources(KEY_ADMIN, {"PROJECT": []})
    assert not r.resources, [x.resource for x in r.resources]
    # Pagination: one per page.
    seen, token, pages = [], "", 0
    while True:
        page = TW.get_resources(KEY_ADMIN, {"Type": []}, page_size=1, page_token=token)
        pages += 1
        assert len(page.resources) == 1, page
        seen.append(page.resources[0].resource)
        token = page.next_page_token
        if not token:
            break
        assert pages < 10, "pagination does not end"
    assert seen == sorted([K_ALPHA, K_BETA, K_RESERVED]) and pages == 3, (seen, pages)
    page = TW.get_resources(KEY_ADMIN, {"Type": []}, page_size=2)
    assert len(page.resources) == 2 and page.next_page_token
    page = TW.get_resources(KEY_ADMIN, {"Type": []}, page_size=2, page_token=page.next_page_token)
    assert [x.resource for x in page.resources] == [K_RESERVED] and page.next_page_token == ""
    assert [x.resource for x in TW.iter_resources(KEY_ADMIN, {"Type": []}, page_size=2)] == seen
    expect_error(
        lambda: TW.get_resources(ALPHA, {"Project": ["Alpha"]}), grpc.StatusCode.PERMISSION_DENIED, "AccessDeniedException"
    )
    expect_error(lambda: TW.get_resources(KEY_ADMIN, {}), grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "tag_filters")
    expect_error(
        lambda: TW.get_resources(KEY_ADMIN, {"Type": []}, page_token="%%%"),
        grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "page_token",
    )
    expect_error(
        lambda: TW.get_resources(KEY_ADMIN, {"Type": []}, page_size=1001),
        grpc.StatusCode.INVALID_ARGUMENT, "ValidationException", "page_size",
    )


@check("Admin without the token (or with a wrong one): UNAUTHENTICATED on Apply, Watch and Export")
def _():
    rev = current_revision()
    for token in (None, "wrong-" + SRV.token):
        with TagwardClient(SRV.data_addr, SRV.admin_addr, token=token) as c:
            expect_error(lambda: c.apply([set_tags(K_ALPHA, {"Project": "Beta"})]), grpc.StatusCode.UNAUTHENTICATED)
            expect_error(lambda: next(iter(c.watch(0, timeout=5))), grpc.StatusCode.UNAUTHENTICATED)
            expect_error(lambda: c.export(), grpc.StatusCode.UNAUTHENTICATED)
            # The data plane needs no token.
            assert c.authorize(ALPHA, "kms:Decrypt", K_ALPHA).decision == pb.ALLOW
    assert current_revision() == rev, "an unauthenticated update was applied"


@check("Watch from a revision: backlog then live events, tag changes with before/after")
def _():
    rev = current_revision()
    t = TW.tag_resource(KEY_ADMIN, K_ALPHA, {"Type": "Watched"})
    assert t.revision == rev + 1
    with TW.watch(rev, timeout=15) as events:
        e = next(events)  # from the backlog
        assert e.revision == rev + 1 and e.WhichOneof("event") == "tag_change", e
        assert e.actor == KEY_ADMIN and e.time_unix_ms > 1_600_000_000_000, e
        tc = e.tag_change
        assert tc.resource == K_ALPHA and tc.action == "kms:TagResource", tc
        assert tag_dict(tc.before) == {"Project": "Alpha", "Type": "General"}, tag_dict(tc.before)
        assert tag_dict(tc.after) == {"Project": "Alpha", "Type": "Watched"}, tag_dict(tc.after)
        # Live: an admin change and an entity change while the stream is open.
        acks = TW.apply([set_tags(K_ALPHA, {"Type": "General"}), put_principal(f"arn:aws:iam::{ACCOUNT}:role/Watched")])
        e = next(events)
        assert e.revision == acks[0].revision and e.actor == "admin", e
        assert e.tag_change.resource == K_ALPHA and e.tag_change.action == "admin", e
        assert tag_dict(e.tag_change.before) == {"Project": "Alpha", "Type": "Watched"}, e
        assert tag_dict(e.tag_change.after) == {"Project": "Alpha", "Type": "General"}, e
        e = next(events)
        assert e.revision == acks[1].revision and e.WhichOneof("event") == "entity_change", e
        ec = e.entity_change
        assert (ec.kind, ec.name, ec.change) == ("principal", f"arn:aws:iam::{ACCOUNT}:role/Watched", "put"), ec
    # from_revision 0: only new events (none of the backlog). The server
    # subscribes the watcher when the call arrives; keep changing a tag until
    # one is seen, so the check does not depend on timing.
    opened_at = current_revision()
    with TW.watch(0, timeout=15) as events:
        got = threading.Event()

        def poke() -> None:
            for i in range(100):
                if got.is_set():
                    return
                TW.apply([set_tags(K_RESERVED, {"Seen": str(i)})])
                got.wait(0.1)

        poker = threading.Thread(target=poke, daemon=True)
        poker.start()
        try:
            e = next(events)
        finally:
            got.set()
            poker.join()
        assert e.revision > opened_at, f"watch(0) replayed revision {e.revision} (opened at {opened_at})"
        assert e.actor == "admin" and "Seen" in tag_dict(e.tag_change.after), e
    TW.apply([remove_tags(K_RESERVED, ["Seen"])])


@check("Export: the whole state at one revision (policies, principals, resources)")
def _():
    rev = current_revision()
    items = TW.export()
    assert items and all(i.revision == rev for i in items), (rev, {i.revision for i in items})
    kinds = [i.update.WhichOneof("op") for i in items]
    order = {"put_policy": 0, "put_principal": 1, "put_resource": 2}
    assert kinds == sorted(kinds, key=order.__getitem__), kinds
    assert kinds.count("put_resource") == 4, kinds  # + the untagged key
    with open(WORLD) as f:
        world = json.load(f)
    assert kinds.count("put_policy") == len(world["policies"]) + 1  # + TagAnything


@check("The wider chain over the admin stream: organization, session, endpoint, boundary, trust policy; Watch kinds")
def _():
    allow_all = {"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "*", "Resource": "*"}}
    dev = f"arn:aws:iam::{ACCOUNT}:role/ChainDev"
    user = f"arn:aws:iam::{ACCOUNT}:user/chain-user"
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/ChainDev/job"
    vpce = "vpce-0a1b2c3d4e5f67890"
    trust = {"Statement": {"Sid": "TrustUser", "Effect": "Allow", "Principal": {"AWS": user}, "Action": "sts:AssumeRole"}}
    org = {
        "id": "o-a1b2c3d4e5",
        "policies": {
            "Full": allow_all,
            "NoDisable": {"Statement": {"Sid": "NoDisable", "Effect": "Deny", "Action": "kms:DisableKey", "Resource": "*"}},
        },
        "units": [{"id": "r-ab12", "scps": ["Full", "NoDisable"]}],
        "accounts": [{"id": ACCOUNT, "parent": "r-ab12", "scps": ["Full"]}],
    }
    rev = current_revision()
    acks = TW.apply(
        [
            put_policy("ChainAll", allow_all),
            put_policy("ChainKms", {"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}}),
            put_principal(dev, policies=["ChainAll"], trust_policy=trust),
            put_principal(user, policies=["ChainAll"], permissions_boundary="ChainKms"),
            put_session(session, policy={"Statement": {"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}}),
            put_endpoint(vpce, {"Statement": {"Effect": "Allow", "Principal": {"AWS": user}, "Action": "*", "Resource": "*"}}),
            put_organization(org),
        ]
    )
    assert all(not a.HasField("error") for a in acks), acks
    denied = lambda r: r.decision == pb.DENY  # noqa: E731
    r = TW.authorize(dev, "kms:DisableKey", K_ALPHA)
    assert denied(r) and r.reason == pb.EXPLICIT_DENY and [m.sid for m in r.matched] == ["NoDisable"], r
    assert [m.policy for m in r.matched] == ["scp:NoDisable"], r
    assert TW.authorize(session, "kms:Encrypt", K_ALPHA).decision == pb.ALLOW
    assert denied(TW.authorize(session, "kms:Decrypt", K_ALPHA))
    assert denied(TW.authorize(dev, "kms:Decrypt", K_ALPHA, context={"aws:SourceVpce": vpce}))
    assert denied(TW.authorize(user, "s3:GetObject", "arn:aws:s3:::b/o")), "outside the boundary"
    r = TW.authorize(user, "sts:AssumeRole", dev)
    assert r.decision == pb.ALLOW and "TrustUser" in [m.sid for m in r.matched], r
    with TW.watch(rev, timeout=15) as events:
        kinds = [(e.entity_change.kind, e.entity_change.change) for e in (next(events) for _ in acks)]
    assert kinds[-3:] == [("session", "put"), ("endpoint", "put"), ("organization", "put")], kinds
    # Undo, so later checks see the world they expect.
    acks = TW.apply([delete_organization(), delete_session(session), delete_endpoint(vpce)])
    assert all(not a.HasField("error") for a in acks), acks
    again = TW.apply([delete_session(session)])
    assert again[0].error.code == "NoSuchEntityException", again
    assert TW.authorize(dev, "kms:DisableKey", K_ALPHA).decision == pb.ALLOW


@check("Kms: CreateAlias, Authorize on the alias ARN, CreateGrant/ListGrants/RevokeGrant, errors by KMS name")
def _():
    admin_role = f"arn:aws:iam::{ACCOUNT}:role/KmsWire"
    acks = TW.apply([
        put_policy("KmsWire", {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
            "kms:CreateAlias", "kms:DeleteAlias", "kms:ListAliases", "kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"]}]}),
        put_principal(admin_role, policies=["KmsWire"]),
    ])
    assert all(not a.HasField("error") for a in acks), acks
    alias = "alias/wire-" + secrets.token_hex(4)
    alias_arn = f"arn:aws:kms:us-east-1:{ACCOUNT}:{alias}"
    w = TW.create_alias(admin_role, alias, K_UNTAGGED)
    assert w.changed and w.revision > 0, w
    expect_error(lambda: TW.create_alias(admin_role, alias, K_BETA), grpc.StatusCode.ALREADY_EXISTS, "AlreadyExistsException")
    expect_error(lambda: TW.create_alias(admin_role, "alias/aws/x", K_BETA), grpc.StatusCode.INVALID_ARGUMENT,
                 "InvalidAliasNameException")
    expect_error(lambda: TW.create_alias(ALPHA, "alias/other", K_BETA), grpc.StatusCode.PERMISSION_DENIED,
                 "AccessDeniedException")
    names = [a.alias_name for a in TW.list_aliases(admin_role, K_UNTAGGED).aliases]
    assert names == [alias], names
    expect_error(lambda: TW.create_grant(admin_role, K_UNTAGGED, ALPHA, ["Sign"]), grpc.StatusCode.INVALID_ARGUMENT,
                 "ValidationException")
    g = TW.create_grant(admin_role, K_UNTAGGED, ALPHA, ["DescribeKey"])
    assert len(g.grant_id) == 64, g
    r = TW.authorize(ALPHA, "kms:DescribeKey", alias_arn, min_revision=g.revision)
    assert r.decision == pb.ALLOW, r
    assert ("grant:" + g.grant_id, 0, g.grant_id, "Allow") in refs(r.matched), refs(r.matched)
    assert [x.id for x in TW.list_grants(admin_role, K_UNTAGGED).grants] == [g.grant_id]
    TW.revoke_grant(admin_role, K_UNTAGGED, g.grant_id)
    expect_error(lambda: TW.revoke_grant(admin_role, K_UNTAGGED, g.grant_id), grpc.StatusCode.NOT_FOUND, "NotFoundException")
    d = TW.delete_alias(admin_role, alias_arn)
    assert TW.authorize(ALPHA, "kms:DescribeKey", alias_arn, min_revision=d.revision).decision == pb.DENY


def make_pki(dirname: str) -> Dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a
    client certificate (a SPIFFE URI SAN), as PEM files in ``dirname``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject: str, key, issuer: str, issuer_key, ca: bool, sans, usage):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    import ipaddress

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("wire test CA", ca_key, "wire test CA", ca_key, True, None, None)
    files: Dict[str, str] = {}

    def write(label: str, data: bytes) -> None:
        files[label] = os.path.join(dirname, f"{label}.pem")
        with open(files[label], "wb") as f:
            f.write(data)

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    write("ca", ca.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = build("tagward", server_key, "wire test CA", ca_key, False, sans, ExtendedKeyUsageOID.SERVER_AUTH)
    write("server", server.public_bytes(serialization.Encoding.PEM))
    write("server-key", key_pem(server_key))
    client_key = ec.generate_private_key(ec.SECP256R1())
    spiffe = [x509.UniformResourceIdentifier("spiffe://example.org/ns/default/sa/wire")]
    client = build("wire client", client_key, "wire test CA", ca_key, False, spiffe, ExtendedKeyUsageOID.CLIENT_AUTH)
    write("client", client.public_bytes(serialization.Encoding.PEM))
    write("client-key", key_pem(client_key))
    return files


def transport_check(binary: str) -> Tuple[bool, str]:
    """A second server: mTLS on the data listener, the admin listener on a
    Unix socket. The client reaches both (https:// with the CA and its
    certificate; unix:///PATH), is refused without its certificate, and a
    TLS argument for a Unix socket alone is a ValueError naming it."""
    tmp = tempfile.mkdtemp(prefix="tagward-wire-tls-")
    pki = make_pki(tmp)
    sock = f"unix://{os.path.join(tmp, 'admin.sock')}"
    tls = {"tls_ca": pki["ca"], "tls_cert": pki["client"], "tls_key": pki["client-key"]}
    srv = Server(
        binary,
        token=secrets.token_urlsafe(24),
        args=["--tls-cert", pki["server"], "--tls-key", pki["server-key"], "--tls-client-ca", pki["ca"]],
        data_scheme="https://",
        admin_listen=sock,
        client=tls,
    )
    try:
        srv.start()
        with TagwardClient(srv.data_addr, srv.admin_addr, srv.token, **tls) as tw:
            r = tw.authorize(ALPHA, "kms:Decrypt", K_ALPHA)
            assert r.decision == pb.ALLOW, r
            # The admin plane over the Unix socket (plaintext, with the token).
            [ack] = tw.apply([set_tags(K_RESERVED, {"Via": "unix"})])
            assert tw.authorize(ALPHA, "kms:Decrypt", K_ALPHA, min_revision=ack.revision).revision >= ack.revision
        # The CA given as bytes and the name overridden: the same server.
        with open(pki["ca"], "rb") as f:
            ca_pem = f.read()
        with TagwardClient(srv.data_addr, tls_ca=ca_pem, tls_cert=pki["client"], tls_key=pki["client-key"], tls_server_name="localhost") as tw:
            assert tw.authorize(ALPHA, "kms:Decrypt", K_ALPHA).decision == pb.ALLOW
        # No client certificate: the sidecar refuses the connection.
        with TagwardClient(srv.data_addr, tls_ca=pki["ca"], timeout=3) as tw:
            try:
                tw.authorize(ALPHA, "kms:Decrypt", K_ALPHA)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e.code()
            else:
                raise AssertionError("served without a client certificate")
        for kwargs, want in (
            ({"tls_ca": pki["ca"]}, "tls_ca (--tls-ca): unix://"),
            ({"tls_cert": pki["client"]}, "tls_cert (--tls-cert): needs tls_key (--tls-key)"),
        ):
            try:
                TagwardClient(sock, **kwargs)
            except ValueError as e:
                assert str(e).startswith(want), e
            else:
                raise AssertionError(f"{kwargs}: accepted")
        try:
            TagwardClient("127.0.0.1:1", tls_ca=os.path.join(tmp, "missing.pem"))
        except ValueError as e:
            assert str(e).startswith("tls_ca (--tls-ca): cannot read"), e
        else:
            raise AssertionError("a missing CA file was accepted")
        return True, f"mTLS data ({srv.data_addr}) and a Unix-socket admin listener ({srv.admin_addr})"
    finally:
        srv.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def stop_server_check(srv: Server) -> Tuple[bool, str]:
    """SIGTERM: an open Watch ends, exit code 0 within 15 s."""
    assert srv.proc is not None
    watch = TW.watch(0, timeout=30)
    ended = threading.Event()
    outcome: List[str] = []

    def drain() -> None:
        try:
            for _ in watch:
                pass
            outcome.append("ended")
        except grpc.RpcError as e:
            outcome.append(e.code().name)
        ended.set()

    threading.Thread(target=drain, daemon=True).start()
    time.sleep(0.2)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        srv.kill()
        return False, "still running 15 s after SIGTERM"
    took = time.monotonic() - t0
    if code != 0:
        return False, f"exit code {code} after SIGTERM\n{srv.log_tail()}"
    if not ended.wait(5):
        watch.cancel()
        return False, f"exited 0 in {took:.1f}s but an open Watch stream did not end"
    return True, f"exit 0 in {took:.2f}s; the open Watch stream ended ({outcome[0] if outcome else '?'})"


# --------------------------------------------------------------------- main


def main() -> int:
    global SRV, TW
    binary = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TAGWARD_BIN") or os.path.join(ROOT, "target", "debug", "tagward")
    binary = os.path.abspath(binary)
    if not os.access(binary, os.X_OK):
        print(f"no executable tagward binary at {binary} (build it with `cargo build`)")
        print("0 passed, 1 failed")
        return 1
    passed = failed = 0
    SRV = Server(binary, token=secrets.token_urlsafe(24))
    try:
        t0 = time.monotonic()
        SRV.start()
        print(f"started {binary} (data {SRV.data_addr}, admin {SRV.admin_addr}) in {time.monotonic() - t0:.2f}s; SERVING")
    except Exception as e:  # noqa: BLE001
        print(f"FAIL start the server: {e}")
        print("0 passed, 1 failed")
        return 1
    TW = TagwardClient(SRV.data_addr, SRV.admin_addr, token=SRV.token)
    try:
        assert SRV.proc is not None
        for name, fn in CHECKS:
            try:
                if SRV.proc.poll() is not None:
                    raise RuntimeError(f"the server has exited ({SRV.proc.returncode})\n{SRV.log_tail()}")
                fn()
            except Exception as e:  # noqa: BLE001
                failed += 1
                where = traceback.extract_tb(e.__traceback__)[-1]
                detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                print(f"FAIL {name}\n     line {where.lineno}: {detail}")
            else:
                passed += 1
                print(f"ok   {name}")
        try:
            ok, detail = transport_check(binary)
        except Exception as e:  # noqa: BLE001
            where = traceback.extract_tb(e.__traceback__)[-1]
            ok, detail = False, f"line {where.lineno}: {type(e).__name__}: {e}"
        if ok:
            passed += 1
            print(f"ok   TLS and Unix sockets: {detail}")
        else:
            failed += 1
            print(f"FAIL TLS and Unix sockets: {detail}")
        try:
            ok, detail = stop_server_check(SRV)
        except Exception as e:  # noqa: BLE001
            ok, detail = False, f"{type(e).__name__}: {e}"
        if ok:
            passed += 1
            print(f"ok   SIGTERM: {detail}")
        else:
            failed += 1
            print(f"FAIL SIGTERM: {detail}")
    finally:
        TW.close()
        SRV.kill()
        try:
            os.unlink(SRV.log.name)
        except OSError:
            pass
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
