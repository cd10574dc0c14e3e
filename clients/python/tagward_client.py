"""A small Python client for the Tagward wire API (proto/tagward/v1/tagward.proto).

Tagward serves ``Authorizer`` and ``Tagging`` (plus ``grpc.health.v1`` and
server reflection) on its data listener and ``Admin`` on its admin listener.
This module wraps the generated stubs with plain-Python arguments::

    from tagward_client import TagwardClient, error_reason

    with TagwardClient("127.0.0.1:50051", "127.0.0.1:50052", token="s3cret") as tw:
        r = tw.authorize("arn:aws:iam::111122223333:role/AlphaApp", "kms:Decrypt",
                         "arn:aws:kms:us-east-1:111122223333:key/1234abcd-...")
        print(tw.decision_name(r.decision), tw.reason_name(r.reason), r.revision)

        [ack] = tw.apply([set_tags(key_arn, {"Project": "Beta"})])
        r = tw.authorize(..., min_revision=ack.revision)

Errors are ``grpc.RpcError``; :func:`error_reason` returns the AWS-style
error name (``AccessDeniedException``, ``TagException``, ...) that Tagward
puts in the status details as a ``google.rpc.ErrorInfo``.

The generated modules live in ``tagward_pb/`` next to this file; run
``generate.sh`` first. Also a tiny CLI: ``python3 tagward_client.py --help``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import grpc
from google.protobuf import text_format
from google.rpc.error_details_pb2 import ErrorInfo
from grpc_status import rpc_status

_GENERATED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tagward_pb")
if _GENERATED not in sys.path:
    sys.path.insert(0, _GENERATED)
try:
    from tagward.v1 import tagward_pb2 as pb  # noqa: E402
    from tagward.v1 import tagward_pb2_grpc as pb_grpc  # noqa: E402
except ImportError as e:  # pragma: no cover - a setup error, explained
    raise ImportError(
        f"the generated Tagward modules are missing from {_GENERATED} ({e}); run clients/python/generate.sh"
    ) from e

__all__ = [
    "pb",
    "pb_grpc",
    "TagwardClient",
    "ClientTls",
    "ApplySession",
    "WatchStream",
    "ErrorInfo",
    "error_info",
    "error_reason",
    "tags",
    "tag_dict",
    "context_value",
    "put_policy",
    "delete_policy",
    "put_principal",
    "put_resource",
    "set_tags",
    "remove_tags",
    "batch",
    "replace_world",
    "put_organization",
    "delete_organization",
    "put_session",
    "delete_session",
    "put_endpoint",
    "delete_endpoint",
]

#: Tags as a mapping, (key, value) pairs, or ``pb.Tag`` messages.
TagsLike = Union[Mapping[str, str], Iterable[Tuple[str, str]], Iterable["pb.Tag"]]
#: A request-context value: text, number, boolean, a list of strings, or the message.
ContextLike = Union[str, bool, int, float, Sequence[str], "pb.ContextValue"]

#: The default deadline of unary calls, in seconds.
DEFAULT_TIMEOUT = 10.0


# ------------------------------------------------------------------ helpers


def tags(value: Optional[TagsLike]) -> list:
    """Converts tags (a dict, (key, value) pairs or ``pb.Tag``s) to ``pb.Tag`` messages, in order."""
    if value is None:
        return []
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for t in items:
        if isinstance(t, pb.Tag):
            out.append(t)
        else:
            k, v = t
            out.append(pb.Tag(key=k, value=v))
    return out


def tag_dict(value: Iterable["pb.Tag"]) -> dict:
    """``pb.Tag`` messages as a dict (key -> value)."""
    return {t.key: t.value for t in value}


def context_value(value: ContextLike) -> "pb.ContextValue":
    """One request-context value as a ``pb.ContextValue``."""
    if isinstance(value, pb.ContextValue):
        return value
    if isinstance(value, bool):  # before int: bool is an int
        return pb.ContextValue(bool_value=value)
    if isinstance(value, (int, float)):
        return pb.ContextValue(number_value=float(value))
    if isinstance(value, str):
        return pb.ContextValue(string_value=value)
    return pb.ContextValue(list_value=pb.StringList(values=list(value)))


def _context(ctx: Optional[Mapping[str, ContextLike]]) -> dict:
    return {k: context_value(v) for k, v in (ctx or {}).items()}


def _string_list(values: Optional[Sequence[str]]) -> Optional["pb.StringList"]:
    return None if values is None else pb.StringList(values=list(values))


def error_info(err: grpc.RpcError) -> Optional[ErrorInfo]:
    """The ``google.rpc.ErrorInfo`` in a failed call's status details, or None.

    Reads ``grpc-status-details-bin`` with ``grpc_status.rpc_status.from_call``
    (which raises ValueError when the details contradict the call's code or
    message).
    """
    if not isinstance(err, grpc.Call):
        return None
    status = rpc_status.from_call(err)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(ErrorInfo.DESCRIPTOR):
            info = ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def error_reason(err: grpc.RpcError) -> Optional[str]:
    """The AWS-style error name (``ErrorInfo.reason``) of a failed call, or None."""
    info = error_info(err)
    return info.reason if info is not None else None


# --------------------------------------------------------- update builders


def _update(**op: Any) -> "pb.Update":
    return pb.Update(**op)


def put_policy(name: str, document: Union[str, Mapping[str, Any]]) -> "pb.Update":
    """Creates or replaces a managed policy (the document as JSON text or a dict)."""
    if not isinstance(document, str):
        import json

        document = json.dumps(document)
    return _update(put_policy=pb.PutPolicy(name=name, document=document))


def delete_policy(name: str) -> "pb.Update":
    return _update(delete_policy=pb.DeletePolicy(name=name))


def _json_text(document: Union[None, str, Mapping[str, Any]]) -> str:
    """A policy or world document as JSON text ('' for None)."""
    if document is None:
        return ""
    if isinstance(document, str):
        return document
    import json

    return json.dumps(document)


def put_principal(
    arn: str,
    tags_: Optional[TagsLike] = None,
    policies: Sequence[str] = (),
    inline_policies: Optional[Mapping[str, str]] = None,
    pending_policies: Sequence[str] = (),
    permissions_boundary: str = "",
    trust_policy: Union[None, str, Mapping[str, Any]] = None,
) -> "pb.Update":
    """Creates or replaces an IAM user or role. ``pending_policies``: managed
    policy names that need not exist yet (attached after ``policies``).
    ``permissions_boundary``: a managed policy name; ``trust_policy`` (roles
    only): the document that decides sts:AssumeRole on the role."""
    return _update(
        put_principal=pb.Principal(
            arn=arn,
            tags=tags(tags_),
            policies=list(policies),
            inline_policies=dict(inline_policies or {}),
            pending_policies=list(pending_policies),
            permissions_boundary=permissions_boundary,
            trust_policy=_json_text(trust_policy),
        )
    )


def put_organization(organization: Union[str, Mapping[str, Any]]) -> "pb.Update":
    """Sets or replaces the organization (the world file's ``organization``
    shape: id, management_account, policies, units, accounts)."""
    return _update(put_organization=pb.PutOrganization(organization_json=_json_text(organization)))


def delete_organization() -> "pb.Update":
    return _update(delete_organization=pb.DeleteOrganization())


def put_session(
    arn: str,
    policy: Union[None, str, Mapping[str, Any]] = None,
    policies: Sequence[str] = (),
    tags_: Optional[TagsLike] = None,
) -> "pb.Update":
    """Declares an assumed-role session with an inline session policy,
    managed session policies (by name) and session tags."""
    return _update(put_session=pb.Session(arn=arn, policy=_json_text(policy), policies=list(policies), tags=tags(tags_)))


def delete_session(arn: str) -> "pb.Update":
    return _update(delete_session=pb.DeleteEntity(arn=arn))


def put_endpoint(id_: str, policy: Union[None, str, Mapping[str, Any]] = None) -> "pb.Update":
    """Adds or replaces a VPC endpoint (no policy: it allows all)."""
    return _update(put_endpoint=pb.Endpoint(id=id_, policy=_json_text(policy)))


def delete_endpoint(id_: str) -> "pb.Update":
    return _update(delete_endpoint=pb.DeleteEndpoint(id=id_))


def delete_principal(arn: str) -> "pb.Update":
    return _update(delete_principal=pb.DeleteEntity(arn=arn))


def put_resource(arn: str, tags_: Optional[TagsLike] = None, **fields: str) -> "pb.Update":
    """Creates or replaces a resource; ``fields`` are the other ``pb.Resource`` fields."""
    return _update(put_resource=pb.Resource(arn=arn, tags=tags(tags_), **fields))


def delete_resource(arn: str) -> "pb.Update":
    return _update(delete_resource=pb.DeleteEntity(arn=arn))


def set_tags(resource: str, tags_: TagsLike) -> "pb.Update":
    """Writes tags as the administrator (tag rules apply, authorization does not)."""
    return _update(set_tags=pb.SetTags(resource=resource, tags=tags(tags_)))


def remove_tags(resource: str, tag_keys: Sequence[str]) -> "pb.Update":
    return _update(remove_tags=pb.RemoveTags(resource=resource, tag_keys=list(tag_keys)))


def batch(updates: Sequence["pb.Update"]) -> "pb.Update":
    """Several updates applied all or nothing."""
    return _update(batch=pb.Batch(updates=list(updates)))


def replace_world(world_json: str) -> "pb.Update":
    return _update(replace_world=pb.ReplaceWorld(world_json=world_json))


def _apply_request(update: Union["pb.Update", "pb.ApplyRequest"], id_: str) -> "pb.ApplyRequest":
    if isinstance(update, pb.ApplyRequest):
        return update if update.id else pb.ApplyRequest(id=id_, update=update.update)
    return pb.ApplyRequest(id=id_, update=update)


# ------------------------------------------------------------------ streams


class ApplySession:
    """One open ``Admin.Apply`` stream, used in lockstep: :meth:`send` writes
    one update and waits for its acknowledgement. An update refused by the
    server comes back with ``error`` set and leaves the stream open.

    Use as a context manager, or call :meth:`close`.
    """

    _END = object()

    def __init__(self, stub: "pb_grpc.AdminStub", metadata: Sequence[Tuple[str, str]], timeout: Optional[float]):
        self._requests: "queue.Queue[Any]" = queue.Queue()
        self._call = stub.Apply(self._request_iter(), metadata=list(metadata), timeout=timeout)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False

    def _request_iter(self) -> Iterator["pb.ApplyRequest"]:
        while True:
            item = self._requests.get()
            if item is self._END:
                return
            yield item

    def send(self, update: Union["pb.Update", "pb.ApplyRequest"], id: Optional[str] = None) -> "pb.ApplyResponse":
        """Sends one update on this stream and returns its acknowledgement."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the apply stream is closed")
            req = _apply_request(update, id if id is not None else f"u{next(self._ids)}")
            self._requests.put(req)
            ack = next(self._call)
            if ack.id != req.id:
                raise RuntimeError(f"acknowledgement for {ack.id!r} came for update {req.id!r}")
            return ack

    def close(self) -> None:
        """Half-closes the stream and waits for the server to end it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._requests.put(self._END)
            try:
                for _ in self._call:  # nothing is pending; drains to the end
                    pass
            except grpc.RpcError:
                pass

    def __enter__(self) -> "ApplySession":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self._call.cancel()
        self.close()


class WatchStream:
    """The events of ``Admin.Watch``: iterate for :class:`pb.WatchEvent`s;
    :meth:`cancel` (or leaving the ``with`` block) ends the stream."""

    def __init__(self, call: Any):
        self._call = call

    def __iter__(self) -> "WatchStream":
        return self

    def __next__(self) -> "pb.WatchEvent":
        return next(self._call)

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "WatchStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()


# ------------------------------------------------------------------ client


Pem = Union[str, bytes, "os.PathLike[str]"]


class ClientTls:
    """A client's TLS settings (see :class:`TagwardClient`); every error
    names the argument and its CLI flag."""

    _FLAGS = (("tls_ca", "--tls-ca"), ("tls_cert", "--tls-cert"), ("tls_key", "--tls-key"), ("tls_server_name", "--tls-server-name"))

    def __init__(
        self,
        ca: Optional[Pem] = None,
        cert: Optional[Pem] = None,
        key: Optional[Pem] = None,
        server_name: Optional[str] = None,
    ):
        self.ca, self.cert, self.key, self.server_name = ca, cert, key, server_name
        if (cert is None) != (key is None):
            given, missing = ("tls_cert (--tls-cert)", "tls_key (--tls-key)") if key is None else ("tls_key (--tls-key)", "tls_cert (--tls-cert)")
            raise ValueError(f"{given}: needs {missing}, the other half of the client certificate")

    def flag(self) -> Optional[str]:
        """The first TLS argument given, as ``name (--flag)``."""
        for (name, flag), value in zip(self._FLAGS, (self.ca, self.cert, self.key, self.server_name)):
            if value is not None:
                return f"{name} ({flag})"
        return None

    @staticmethod
    def _pem(name: str, value: Optional[Pem]) -> Optional[bytes]:
        if value is None or isinstance(value, bytes):
            return value
        try:
            with open(value, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"{name}: cannot read {os.fspath(value)}: {e.strerror or e}") from e
        if b"-----BEGIN " not in data:
            raise ValueError(f"{name}: {os.fspath(value)} is not PEM")
        return data

    def channel(self, addr: str, only_unix: bool = True) -> grpc.Channel:
        """A channel to ``addr`` (``HOST:PORT``, ``http://``, ``https://`` or
        ``unix:///PATH``), with TLS when asked for."""
        flag = self.flag()
        if addr.startswith("unix:"):
            if not addr.startswith("unix:///"):
                raise ValueError(f"{addr!r}: a Unix socket is unix:///ABSOLUTE/PATH (three slashes)")
            if flag and only_unix:
                raise ValueError(f"{flag}: {addr} is a Unix socket, which the sidecar serves without TLS")
            # grpcio's default :authority for a Unix socket is the escaped
            # path, which the sidecar's HTTP/2 stack refuses (RST_STREAM
            # PROTOCOL_ERROR): send "localhost", as the Rust clients do.
            return grpc.insecure_channel(addr, options=[("grpc.default_authority", "localhost")])
        if addr.startswith("http://"):
            if flag:
                raise ValueError(f"{flag}: {addr} is plaintext (http://); give https://HOST:PORT or HOST:PORT for TLS")
            return grpc.insecure_channel(addr[len("http://"):].rstrip("/"))
        if "://" in addr and not addr.startswith("https://"):
            raise ValueError(f"{addr!r}: expected HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:///PATH")
        https = addr.startswith("https://")
        target = addr[len("https://"):].rstrip("/") if https else addr
        if not (https or flag):
            return grpc.insecure_channel(target)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self._pem("tls_ca (--tls-ca)", self.ca),
            private_key=self._pem("tls_key (--tls-key)", self.key),
            certificate_chain=self._pem("tls_cert (--tls-cert)", self.cert),
        )
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(target, creds, options=options)


class TagwardClient:
    """A client of one Tagward sidecar.

    ``data_addr`` serves Authorizer, Tagging, health and reflection;
    ``admin_addr`` serves Admin (optional when no admin call is made). With
    ``token`` every Admin call carries ``authorization: Bearer <token>``.
    ``timeout`` is the default deadline of every unary call and of
    :meth:`apply`, in seconds.

    An address is ``HOST:PORT``, ``http://HOST:PORT``, ``https://HOST:PORT``
    or ``unix:///PATH`` (a Unix socket, always plaintext: the sidecar serves
    no TLS there). ``https://`` or any TLS argument means TLS on each TCP
    address: ``tls_ca`` is the CA bundle to trust (grpcio's default roots
    without it), ``tls_cert`` and ``tls_key`` the client certificate and key
    for mTLS, ``tls_server_name`` the name the server certificate must carry
    when it is not the host. Each is a PEM file's path, or the PEM as bytes.
    A TLS argument with only Unix-socket (or ``http://``) addresses is a
    ``ValueError`` naming the argument.
    """

    def __init__(
        self,
        data_addr: str,
        admin_addr: Optional[str] = None,
        token: Optional[str] = None,
        *,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        tls_ca: Optional[Pem] = None,
        tls_cert: Optional[Pem] = None,
        tls_key: Optional[Pem] = None,
        tls_server_name: Optional[str] = None,
    ):
        self.data_addr = data_addr
        self.admin_addr = admin_addr
        self.timeout = timeout
        tls = ClientTls(tls_ca, tls_cert, tls_key, tls_server_name)
        addrs = [a for a in (data_addr, admin_addr) if a]
        both_unix = all(a.startswith("unix:") for a in addrs)
        # TLS settings apply to each TCP address; a Unix socket is plaintext,
        # unless every address is one (then the settings apply to nothing).
        self._data = tls.channel(data_addr, both_unix)
        self._admin = tls.channel(admin_addr, both_unix) if admin_addr else None
        self._admin_metadata: list = [("authorization", f"Bearer {token}")] if token is not None else []
        self.authorizer = pb_grpc.AuthorizerStub(self._data)
        self.tagging = pb_grpc.TaggingStub(self._data)
        self.kms = pb_grpc.KmsStub(self._data)
        self.admin = pb_grpc.AdminStub(self._admin) if self._admin is not None else None

    # -- lifecycle

    def close(self) -> None:
        self._data.close()
        if self._admin is not None:
            self._admin.close()

    def __enter__(self) -> "TagwardClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _admin_stub(self) -> "pb_grpc.AdminStub":
        if self.admin is None:
            raise ValueError("this client has no admin address")
        return self.admin

    # -- names

    @staticmethod
    def decision_name(value: int) -> str:
        """``pb.ALLOW`` -> "ALLOW"."""
        return pb.Decision.Name(value)

    @staticmethod
    def reason_name(value: int) -> str:
        """``pb.EXPLICIT_DENY`` -> "EXPLICIT_DENY"."""
        return pb.Reason.Name(value)

    # -- Authorizer

    def authorize(
        self,
        principal: str,
        action: str,
        resource: str,
        *,
        request_tags: Optional[TagsLike] = None,
        tag_keys: Optional[Sequence[str]] = None,
        session_tags: Optional[TagsLike] = None,
        context: Optional[Mapping[str, ContextLike]] = None,
        min_revision: int = 0,
        explain: bool = False,
        timeout: Optional[float] = None,
    ) -> "pb.AuthorizeResponse":
        """May ``principal`` perform ``action`` on ``resource``?

        ``tag_keys`` None leaves aws:TagKeys to the server (the keys of
        ``request_tags``, if any). ``min_revision``: answer at this revision
        or later (the server waits, bounded, else DEADLINE_EXCEEDED).
        """
        req = pb.AuthorizeRequest(
            principal=principal,
            action=action,
            resource=resource,
            request_tags=tags(request_tags),
            tag_keys=_string_list(tag_keys),
            session_tags=tags(session_tags),
            context=_context(context),
            min_revision=min_revision,
            explain=explain,
        )
        return self.authorizer.Authorize(req, timeout=timeout or self.timeout)

    def batch_authorize(
        self,
        principal: str,
        items: Iterable[Union["pb.BatchItem", Tuple[str, str], Mapping[str, Any]]],
        *,
        session_tags: Optional[TagsLike] = None,
        context: Optional[Mapping[str, ContextLike]] = None,
        min_revision: int = 0,
        explain: bool = False,
        timeout: Optional[float] = None,
    ) -> "pb.BatchAuthorizeResponse":
        """One principal, many (action, resource) items; the results come in item order.

        An item is a ``pb.BatchItem``, an ``(action, resource)`` pair, or a dict
        with ``action``, ``resource`` and optionally ``request_tags``, ``tag_keys``.
        """
        batch_items = []
        for it in items:
            if isinstance(it, pb.BatchItem):
                batch_items.append(it)
            elif isinstance(it, Mapping):
                batch_items.append(
                    pb.BatchItem(
                        action=it["action"],
                        resource=it["resource"],
                        request_tags=tags(it.get("request_tags")),
                        tag_keys=_string_list(it.get("tag_keys")),
                    )
                )
            else:
                action, resource = it
                batch_items.append(pb.BatchItem(action=action, resource=resource))
        req = pb.BatchAuthorizeRequest(
            principal=principal,
            session_tags=tags(session_tags),
            context=_context(context),
            min_revision=min_revision,
            explain=explain,
            items=batch_items,
        )
        return self.authorizer.BatchAuthorize(req, timeout=timeout or self.timeout)

    # -- Tagging

    def tag_resource(
        self,
        principal: str,
        resource: str,
        tags_: TagsLike,
        *,
        session_tags: Optional[TagsLike] = None,
        context: Optional[Mapping[str, ContextLike]] = None,
        timeout: Optional[float] = None,
    ) -> "pb.TagResourceResponse":
        """Tags ``resource`` as ``principal`` (authorized, checked, audited)."""
        req = pb.TagResourceRequest(
            principal=principal,
            resource=resource,
            tags=tags(tags_),
            session_tags=tags(session_tags),
            context=_context(context),
        )
        return self.tagging.TagResource(req, timeout=timeout or self.timeout)

    def untag_resource(
        self,
        principal: str,
        resource: str,
        tag_keys: Sequence[str],
        *,
        session_tags: Optional[TagsLike] = None,
        context: Optional[Mapping[str, ContextLike]] = None,
        timeout: Optional[float] = None,
    ) -> "pb.UntagResourceResponse":
        """Removes tag keys from ``resource`` as ``principal``."""
        req = pb.UntagResourceRequest(
            principal=principal,
            resource=resource,
            tag_keys=list(tag_keys),
            session_tags=tags(session_tags),
            context=_context(context),
        )
        return self.tagging.UntagResource(req, timeout=timeout or self.timeout)

    def list_resource_tags(
        self,
        principal: str,
        resource: str,
        *,
        session_tags: Optional[TagsLike] = None,
        context: Optional[Mapping[str, ContextLike]] = None,
        min_revision: int = 0,
        timeout: Optional[float] = None,
    ) -> "pb.ListResourceTagsResponse":
        """The tags of ``resource``, read as ``principal``."""
        req = pb.ListResourceTagsRequest(
            principal=principal,
            resource=resource,
            session_tags=tags(session_tags),
            context=_context(context),
            min_revision=min_revision,
        )
        return self.tagging.ListResourceTags(req, timeout=timeout or self.timeout)

    # -- Kms: aliases and grants, performed as a principal

    def _kms(self, method: str, request_type: Any, principal: str, session_tags, context, timeout, **fields: Any):
        req = request_type(principal=principal, session_tags=tags(session_tags), context=_context(context), **fields)
        return getattr(self.kms, method)(req, timeout=timeout or self.timeout)

    def create_alias(self, principal: str, alias_name: str, target_key: str, *, session_tags=None, context=None, timeout=None):
        """Creates ``alias_name`` (``alias/NAME``) for ``target_key`` as ``principal``."""
        return self._kms("CreateAlias", pb.CreateAliasRequest, principal, session_tags, context, timeout,
                         alias_name=alias_name, target_key=target_key)

    def update_alias(self, principal: str, alias_name: str, target_key: str, *, session_tags=None, context=None, timeout=None):
        """Points an existing alias at ``target_key``."""
        return self._kms("UpdateAlias", pb.UpdateAliasRequest, principal, session_tags, context, timeout,
                         alias_name=alias_name, target_key=target_key)

    def delete_alias(self, principal: str, alias: str, *, region: str = "", account: str = "", session_tags=None,
                     context=None, timeout=None):
        """Deletes an alias: its ARN, or ``alias/NAME`` with ``region`` and ``account``."""
        return self._kms("DeleteAlias", pb.DeleteAliasRequest, principal, session_tags, context, timeout,
                         alias=alias, region=region, account=account)

    def list_aliases(self, principal: str, key: str = "", *, min_revision: int = 0, session_tags=None, context=None,
                     timeout=None) -> "pb.ListAliasesResponse":
        """The caller account's aliases, or ``key``'s."""
        return self._kms("ListAliases", pb.ListAliasesRequest, principal, session_tags, context, timeout,
                         key=key, min_revision=min_revision)

    def create_grant(self, principal: str, key: str, grantee: str, operations: Sequence[str], *,
                     retiring_principal: str = "", name: str = "",
                     encryption_context_equals: Optional[Mapping[str, str]] = None,
                     encryption_context_subset: Optional[Mapping[str, str]] = None,
                     session_tags=None, context=None, timeout=None) -> "pb.CreateGrantResponse":
        """Creates a grant on ``key`` for ``grantee``; the answer carries the new ``grant_id``."""
        constraints = None
        if encryption_context_equals is not None:
            constraints = pb.GrantConstraints(
                encryption_context_equals=pb.EncryptionContext(pairs=dict(encryption_context_equals)))
        elif encryption_context_subset is not None:
            constraints = pb.GrantConstraints(
                encryption_context_subset=pb.EncryptionContext(pairs=dict(encryption_context_subset)))
        grant = pb.Grant(grantee_principal=grantee, operations=list(operations), retiring_principal=retiring_principal,
                         name=name, constraints=constraints)
        return self._kms("CreateGrant", pb.CreateGrantRequest, principal, session_tags, context, timeout,
                         key=key, grant=grant)

    def retire_grant(self, principal: str, key: str, grant_id: str, *, session_tags=None, context=None, timeout=None):
        """Retires a grant (the retiring principal, or a grantee whose grant includes RetireGrant)."""
        return self._kms("RetireGrant", pb.GrantIdRequest, principal, session_tags, context, timeout,
                         key=key, grant_id=grant_id)

    def revoke_grant(self, principal: str, key: str, grant_id: str, *, session_tags=None, context=None, timeout=None):
        """Revokes a grant (needs kms:RevokeGrant)."""
        return self._kms("RevokeGrant", pb.GrantIdRequest, principal, session_tags, context, timeout,
                         key=key, grant_id=grant_id)

    def list_grants(self, principal: str, key: str, *, min_revision: int = 0, session_tags=None, context=None,
                    timeout=None) -> "pb.ListGrantsResponse":
        """The grants of ``key``."""
        return self._kms("ListGrants", pb.ListGrantsRequest, principal, session_tags, context, timeout,
                         key=key, min_revision=min_revision)

    def get_resources(
        self,
        principal: str,
        tag_filters: Union[Mapping[str, Sequence[str]], Iterable["pb.TagFilter"]],
        *,
        page_size: int = 0,
        page_token: str = "",
        min_revision: int = 0,
        session_tags: Optional[TagsLike] = None,
        context: Optional[Mapping[str, ContextLike]] = None,
        timeout: Optional[float] = None,
    ) -> "pb.GetResourcesResponse":
        """One page of the resources whose tags match every filter, sorted by ARN.

        ``tag_filters`` maps a key to its accepted values (empty: any value).
        """
        if isinstance(tag_filters, Mapping):
            filters = [pb.TagFilter(key=k, values=list(v)) for k, v in tag_filters.items()]
        else:
            filters = list(tag_filters)
        req = pb.GetResourcesRequest(
            principal=principal,
            tag_filters=filters,
            page_size=page_size,
            page_token=page_token,
            min_revision=min_revision,
            session_tags=tags(session_tags),
            context=_context(context),
        )
        return self.tagging.GetResources(req, timeout=timeout or self.timeout)

    def iter_resources(
        self, principal: str, tag_filters: Union[Mapping[str, Sequence[str]], Iterable["pb.TagFilter"]], **kw: Any
    ) -> Iterator["pb.ResourceTags"]:
        """Every matching resource, following ``next_page_token`` across pages."""
        token = ""
        filters = tag_filters if isinstance(tag_filters, Mapping) else list(tag_filters)
        while True:
            page = self.get_resources(principal, filters, page_token=token, **kw)
            yield from page.resources
            token = page.next_page_token
            if not token:
                return

    # -- Admin

    def apply(
        self, updates: Iterable[Union["pb.Update", "pb.ApplyRequest"]], *, timeout: Optional[float] = None
    ) -> list:
        """Sends the updates on one ``Admin.Apply`` stream; returns the
        acknowledgements (``pb.ApplyResponse``) in order. A refused update has
        ``error`` set and does not stop the ones after it.

        Updates without an id get "0", "1", ...; the acknowledgements' ids
        are checked against them.
        """
        reqs = [_apply_request(u, str(i)) for i, u in enumerate(updates)]
        call = self._admin_stub().Apply(iter(reqs), metadata=self._admin_metadata, timeout=timeout or self.timeout)
        acks = list(call)
        if [a.id for a in acks] != [r.id for r in reqs]:
            raise RuntimeError(
                f"Apply acknowledged {[a.id for a in acks]} for the updates {[r.id for r in reqs]}"
            )
        return acks

    def apply_session(self, *, timeout: Optional[float] = None) -> ApplySession:
        """Opens an ``Admin.Apply`` stream to use in lockstep (see :class:`ApplySession`)."""
        return ApplySession(self._admin_stub(), self._admin_metadata, timeout)

    def export(self, *, timeout: Optional[float] = None) -> list:
        """The whole state as the updates (``pb.ExportItem``) that rebuild it."""
        return list(self._admin_stub().Export(pb.ExportRequest(), metadata=self._admin_metadata, timeout=timeout or self.timeout))

    def watch(self, from_revision: int = 0, *, timeout: Optional[float] = None) -> WatchStream:
        """Change events after ``from_revision`` (0: only new ones), then live
        events; iterate the result, and cancel it when done. ``timeout`` is a
        deadline for the whole stream (none by default)."""
        call = self._admin_stub().Watch(
            pb.WatchRequest(from_revision=from_revision), metadata=self._admin_metadata, timeout=timeout
        )
        return WatchStream(call)

    # -- health and reflection (data listener)

    def health(self, service: str = "", *, timeout: Optional[float] = None) -> int:
        """The ``grpc.health.v1`` serving status (``HealthCheckResponse.SERVING`` == 1)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._data)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout).status

    def wait_until_serving(self, deadline_s: float = 15.0, service: str = "") -> None:
        """Polls health until SERVING; raises TimeoutError after ``deadline_s`` seconds."""
        from grpc_health.v1 import health_pb2

        end = time.monotonic() + deadline_s
        last: Any = None
        while time.monotonic() < end:
            try:
                if self.health(service, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = "not SERVING"
            except grpc.RpcError as e:
                last = e.code()
            time.sleep(0.05)
        raise TimeoutError(f"{self.data_addr} not SERVING after {deadline_s}s (last: {last})")

    def list_services(self, *, timeout: Optional[float] = None) -> list:
        """The services the data listener lists over server reflection
        (``grpc.reflection.v1``; its messages are those of v1alpha)."""
        from grpc_reflection.v1alpha import reflection_pb2 as rpb

        call = self._data.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString,
        )
        responses = list(call(iter([rpb.ServerReflectionRequest(list_services="")]), timeout=timeout or self.timeout))
        if not responses:
            raise RuntimeError("reflection returned no response")
        r = responses[0]
        if r.HasField("error_response"):
            raise RuntimeError(f"reflection error: {r.error_response.error_message}")
        return [s.name for s in r.list_services_response.service]

    def describe(self, symbol: str, *, admin: bool = False) -> list:
        """Resolves a message type through server reflection, with every file
        it imports, as grpcurl does; returns its field names. ``admin`` asks
        the admin listener instead of the data listener."""
        from google.protobuf import descriptor_pool
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

        channel = self._admin if admin else self._data
        if channel is None:
            raise ValueError("no admin address")
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        return [f.name for f in pool.FindMessageTypeByName(symbol).fields]


# --------------------------------------------------------------------- CLI


def _describe(r: "pb.AuthorizeResponse") -> str:
    lines = [f"{pb.Decision.Name(r.decision)} ({pb.Reason.Name(r.reason)}) at revision {r.revision}"]
    for s in r.matched:
        sid = f' "{s.sid}"' if s.sid else ""
        lines.append(f"  decided by {s.policy}[{s.index}]{sid} ({s.effect})")
    if r.missing_keys:
        lines.append(f"  missing condition keys: {', '.join(r.missing_keys)}")
    for c in r.considered:
        s = c.statement
        sid = f' "{s.sid}"' if s.sid else ""
        lines.append(f"  considered {s.policy}[{s.index}]{sid} {s.effect}: {c.outcome}")
    return "\n".join(lines)


def _kv(text: str) -> Tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    return k, v


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python3 tagward_client.py authorize|tags|watch ...``; exit 0 allow/ok,
    1 deny, 2 error."""
    p = argparse.ArgumentParser(prog="tagward_client.py", description="Talk to a Tagward sidecar over gRPC.")
    p.add_argument("--server", default=os.environ.get("TAGWARD_ADDR", "127.0.0.1:50051"), help="data address (env TAGWARD_ADDR)")
    p.add_argument("--admin", default=os.environ.get("TAGWARD_ADMIN_ADDR", "127.0.0.1:50052"), help="admin address (env TAGWARD_ADMIN_ADDR)")
    p.add_argument("--token", default=os.environ.get("TAGWARD_ADMIN_TOKEN"), help="admin bearer token (env TAGWARD_ADMIN_TOKEN)")
    env = os.environ.get
    p.add_argument("--tls-ca", default=env("TAGWARD_TLS_CA"), metavar="PEM", help="TLS: trust these CAs (env TAGWARD_TLS_CA)")
    p.add_argument("--tls-cert", default=env("TAGWARD_CLIENT_TLS_CERT"), metavar="PEM", help="mTLS: the client certificate (env TAGWARD_CLIENT_TLS_CERT)")
    p.add_argument("--tls-key", default=env("TAGWARD_CLIENT_TLS_KEY"), metavar="PEM", help="mTLS: its private key (env TAGWARD_CLIENT_TLS_KEY)")
    p.add_argument("--tls-server-name", default=env("TAGWARD_TLS_SERVER_NAME"), metavar="NAME", help="the name the server certificate must carry (env TAGWARD_TLS_SERVER_NAME)")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("authorize", help="may PRINCIPAL do ACTION on RESOURCE?")
    a.add_argument("--principal", required=True)
    a.add_argument("--action", required=True)
    a.add_argument("--resource", required=True)
    a.add_argument("--tag", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="a request tag (repeatable)")
    a.add_argument("--explain", action="store_true", help="list every statement considered")

    t = sub.add_parser("tags", help="list a resource's tags as PRINCIPAL")
    t.add_argument("--principal", required=True)
    t.add_argument("--resource", required=True)

    w = sub.add_parser("watch", help="print change events (admin listener)")
    w.add_argument("--from-revision", type=int, default=0)

    args = p.parse_args(argv)
    try:
        tw = TagwardClient(
            args.server,
            args.admin,
            args.token,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tw:
        try:
            if args.command == "authorize":
                r = tw.authorize(args.principal, args.action, args.resource, request_tags=args.tag, explain=args.explain)
                print(_describe(r))
                return 0 if r.decision == pb.ALLOW else 1
            if args.command == "tags":
                r = tw.list_resource_tags(args.principal, args.resource)
                for tag in r.tags:
                    print(f"{tag.key}={tag.value}")
                return 0
            if args.command == "watch":
                with tw.watch(args.from_revision) as events:
                    for e in events:
                        print(text_format.MessageToString(e, as_one_line=True), flush=True)
                return 0
        except grpc.RpcError as e:
            reason = error_reason(e)
            print(f"error: {e.code().name}{f' {reason}' if reason else ''}: {e.details()}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
