"""Thin adapter over the Kubernetes API: get, list, server-side apply, delete, status, events.

Why not the typed client classes: the operator handles five kinds as plain dicts (that is what
the pure builders produce and the planner reads), and one generic request path keeps retries,
error mapping and server-side apply in one place. Authentication, TLS and proxies still come
from the official ``kubernetes`` client's configuration.

Every write reads the API server's ``Warning`` headers (:func:`warnings`): a field the
server dropped (a status field an older AgentTask CRD lacks, a child field an older
Kubernetes does not know) is an error in the log, once per message and process, never lost
in silence.
"""

from __future__ import annotations

import copy
import datetime as dt
import email.utils
import json
import logging
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubernetes import client, config
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ProxyError, ReadTimeoutError

from slm_operator import naming as n

log = logging.getLogger(__name__)

PLURALS = {
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    (f"{n.GROUP}/{n.VERSION}", n.KIND): n.PLURAL,
}
TASK_API = f"{n.GROUP}/{n.VERSION}"

#: What to do when the API server drops AgentTask status fields: ``helm upgrade`` never
#: updates CRDs, so the cluster's is the one the first install brought.
CRD_ADVICE = (
    "the AgentTask CRD is older than this operator: apply the CRD of the chart this operator "
    "came with (kubectl apply --server-side --force-conflicts -f "
    "charts/slm-fleet-operator/crds/); helm upgrade never updates CRDs"
)
#: Warning kinds (:func:`warning_counts`): a field the API server dropped, or anything else
#: (a deprecation, an admission webhook's words).
UNKNOWN_FIELD, OTHER_WARNING = "unknown_field", "other"
#: How the API server refuses a server-side apply holding a field its schema lacks.
_NOT_IN_SCHEMA = "field not declared in schema"

#: One RFC 7234 warning-value: code, agent, quoted text, optional quoted date. Several join
#: with commas into one header value, and a quoted text may hold commas itself.
_WARNING = re.compile(r'(\d{3})\s+(\S+)\s+"((?:[^"\\]|\\.)*)"(?:\s+"[^"]*")?')
#: How the API server says it dropped a field of a JSON or merge patch (strict decoding, the
#: default ``fieldValidation=Warn``). Server-side apply does not drop one: it refuses the
#: whole apply (``field not declared in schema``), an error the caller sees.
_UNKNOWN_FIELD = re.compile(r'^unknown field "([^"]+)"')
#: (kind, warning) pairs already logged by this process.
_warnings_logged: set[tuple[str, str]] = set()
#: Warnings this process got, by (kind, :data:`UNKNOWN_FIELD` or :data:`OTHER_WARNING`).
_warning_counts: Counter[tuple[str, str]] = Counter()
#: Guards the two above: reconciles write from several threads at once.
_warnings_lock = threading.Lock()


#: The status of a :class:`KubeError` for a request that reached no API server: the connection
#: was refused, its host has no address, or connecting timed out. Nothing answered, so
#: nothing is loaded by trying again soon (the reconcile retries it at most 15 s apart).
UNREACHABLE = 0
#: ...for a request the API server took and did not answer within the client's timeout: the
#: usual sign of an overloaded one, so it is retried as the API server's own 504 (reason
#: Timeout) is, with the long back-off.
TIMED_OUT = 504
#: ...for a request whose connection closed without a whole answer (reset or closed
#: mid-answer, TLS failed, an answer that is not HTTP): retried as a proxy's 502 is.
NO_ANSWER = 502


class KubeError(Exception):
    """An API call failed. ``retryable`` says whether backing off and retrying can help.

    ``status`` is the answer's HTTP status, or for a request that got none
    :data:`UNREACHABLE` (0, reason ``Unreachable``), :data:`TIMED_OUT` (504, ``Timeout``) or
    :data:`NO_ANSWER` (502, ``NoAnswer``): see :func:`unanswered`.
    """

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        if self.status == 500 and _NOT_IN_SCHEMA in self.message:
            # Server-side apply of a field this cluster's API does not have (an older
            # Kubernetes): refused as a 500, yet no retry can help; retried, the task backed
            # off for ever without saying why instead of showing ApplyFailed.
            return False
        return self.status in (UNREACHABLE, 409, 429) or self.status >= 500


class TaskGone(KubeError):
    """The AgentTask does not exist any more (404 on its read or its status write).

    Not retryable, and no failure either: the caller forgets the task. Its DELETED event is
    not always sent: after a watch's 410 Gone kopf lists the tasks again and sends no DELETED
    for one missing from the list, so a task only forgotten on DELETED was read (404) at every
    resync for the life of the process.
    """

    def __init__(self, namespace: str, name: str) -> None:
        super().__init__(404, f"AgentTask {namespace}/{name} does not exist", "NotFound")


class TaskChanged(KubeError):
    """The AgentTask changed (or was deleted and created again) while it was reconciled.

    Its status was not written: it was computed from an object that is no longer current.
    Retryable: the next pass reads the current object.
    """

    def __init__(self, namespace: str, name: str, message: str) -> None:
        super().__init__(
            409,
            f"AgentTask {namespace}/{name} changed while it was reconciled "
            f"({message}); its status was not written",
            "Conflict",
        )


class Listed(list[dict[str, Any]]):
    """The items of a list answer, and ``served_at``: the API server's clock when it answered
    (its ``Date`` header), None without one.

    Why: Job times are the control plane's clock, and an operator node's clock minutes off
    it misjudged how long ago a Job finished (see :attr:`slm_operator.plan.Observed.server_now`).
    A list still, so that every caller that only iterates the items is unchanged.
    """

    def __init__(
        self, items: Iterable[dict[str, Any]] = (), served_at: dt.datetime | None = None
    ) -> None:
        super().__init__(items)
        self.served_at = served_at


def http_date(value: str | None) -> dt.datetime | None:
    """An HTTP ``Date`` header (RFC 9110: ``Mon, 23 Nov 2026 12:00:00 GMT``) as an aware
    datetime; None for none and for one that cannot be read."""
    if not value:
        return None
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)


def unanswered(exc: Exception) -> KubeError:
    """The error of a request that got no HTTP answer, from what the client raised (urllib3's
    error; after its retries, a GET's is in a :class:`MaxRetryError`).

    Why only a failed connect is :data:`UNREACHABLE`: that status is retried at most 15 s
    apart and lets events and resyncs through (an API server coming back is used at once).
    A read timeout was one too, and an API server overloaded into timeouts, alternating
    with its 429s, got a pass per task about every second instead of one in five minutes.
    """
    cause: BaseException | None = exc
    while isinstance(cause, MaxRetryError | ProxyError):
        cause = cause.reason if isinstance(cause, MaxRetryError) else cause.original_error
    if isinstance(cause, ConnectTimeoutError):  # NewConnectionError, NameResolutionError too
        return KubeError(UNREACHABLE, str(exc), "Unreachable")
    if isinstance(cause, ReadTimeoutError | TimeoutError):
        return KubeError(TIMED_OUT, str(exc), "Timeout")
    return KubeError(NO_ANSWER, str(exc), "NoAnswer")


def warnings(headers: Mapping[str, str]) -> list[str]:
    """The texts of the ``Warning`` headers of an answer (RFC 7234: ``299 - "text"``), their
    quoting undone; none for none and for a value that is no warning."""
    value = headers.get("Warning") or ""
    return [re.sub(r"\\(.)", r"\1", m.group(3)) for m in _WARNING.finditer(value)]


def unknown_field(text: str) -> str | None:
    """The field an API server warning says it dropped (``status.retraining.newRecords``);
    None for a warning about anything else."""
    m = _UNKNOWN_FIELD.match(text)
    return m.group(1) if m else None


def warning_counts() -> dict[tuple[str, str], int]:
    """Warnings this process got on its writes, by (kind, :data:`UNKNOWN_FIELD` or
    :data:`OTHER_WARNING`): ``slm_operator_api_warnings_total``."""
    with _warnings_lock:
        return dict(_warning_counts)


def _heed(kind: str, what: str, texts: Iterable[str]) -> None:
    """Count the warnings the API server sent on a write of ``what`` (a ``kind``), and log
    each distinct one once per process: a dropped field as an error with what to do, any
    other as a warning. Once, because every pass writes again and gets the same words; the
    count (:func:`warning_counts`) goes on. The texts carry field names, never values."""
    for text in texts:
        field = unknown_field(text)
        with _warnings_lock:
            _warning_counts[(kind, UNKNOWN_FIELD if field else OTHER_WARNING)] += 1
            if (kind, text) in _warnings_logged:
                continue
            _warnings_logged.add((kind, text))
        if field and kind == n.KIND:
            log.error(
                "the API server dropped %s from the status written to %s (and will from "
                "every AgentTask's): %s",
                field,
                what,
                CRD_ADVICE,
            )
        elif field:
            log.error(
                "the API server dropped %s from the %s written to %s: the cluster's API does "
                "not know a field this operator sets (an older Kubernetes than this operator "
                "supports?), and what it does is missing from every %s this operator writes",
                field,
                kind,
                what,
                kind,
            )
        else:
            log.warning("the API server warned on a write to %s: %s", what, text[:512])


class Written(dict[str, Any]):
    """The object the API server answered a write with, and its ``warnings`` about the write.

    A dict still, so that every caller that reads the answer is unchanged; ``unknown_fields``
    are those the server dropped (:func:`unknown_field`): reconcile tells the task's owner
    about its own (:func:`slm_operator.reconcile._tell_crd_outdated`).
    """

    def __init__(self, answer: Any = None, warnings: Iterable[str] = ()) -> None:
        super().__init__(answer if isinstance(answer, dict) else {})
        self.warnings = tuple(warnings)

    @property
    def unknown_fields(self) -> tuple[str, ...]:
        return tuple(f for f in map(unknown_field, self.warnings) if f)


def load_api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the local kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def without_retries(api: client.ApiClient) -> client.ApiClient:
    """A client like ``api`` whose requests urllib3 does not retry.

    Why: urllib3 retries a GET or PUT that timed out three more times, so a call given a
    5 s timeout takes 20 s against an API server that stopped answering. Leader election
    must know within its renew deadline that it could not renew.
    """
    cfg = copy.deepcopy(api.configuration)
    cfg.retries = False
    return client.ApiClient(cfg)


def _collection(api_version: str, plural: str, namespace: str | None) -> str:
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/namespaces/{namespace}/{plural}" if namespace else f"{root}/{plural}"


def _child_path(obj: Mapping[str, Any]) -> str:
    """The API path of the child ``obj`` (a built Job, Deployment or Service) names."""
    plural = PLURALS[(obj["apiVersion"], obj["kind"])]
    meta = obj["metadata"]
    return f"{_collection(obj['apiVersion'], plural, meta['namespace'])}/{meta['name']}"


def _named(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` of a built child, as the log names it."""
    meta = obj["metadata"]
    return f"{obj['kind']} {meta.get('namespace')}/{meta['name']}"


class Kube:
    def __init__(self, api: client.ApiClient, field_manager: str = n.FIELD_MANAGER) -> None:
        self.api = api
        self.field_manager = field_manager
        self.instance = socket.gethostname()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        return self._exchange(method, path, body, query, content_type, timeout)[0]

    def _exchange(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> tuple[Any, Mapping[str, str]]:
        """:meth:`request`'s answer, and the headers it came with."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        # Bodies stay dicts: the client's REST layer serialises JSON (and JSON-as-YAML for
        # server-side apply) itself; a pre-serialised string would be encoded twice.
        params = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            resp = self.api.call_api(*params, _request_timeout=timeout)
            resp.read()
        except Exception as exc:  # connection refused, TLS, timeouts
            raise unanswered(exc) from exc
        raw = resp.data.decode() if isinstance(resp.data, bytes) else (resp.data or "")
        if resp.status >= 400:
            try:
                st = json.loads(raw)
            except ValueError:
                raise KubeError(resp.status, raw) from None
            if not isinstance(st, dict):  # a proxy's "service unavailable", null, a list
                raise KubeError(resp.status, raw)
            raise KubeError(resp.status, str(st.get("message", raw)), str(st.get("reason", "")))
        return (json.loads(raw) if raw else None), (resp.headers or {})

    # ---------------------------------------------------------------- reads
    def get(self, api_version: str, plural: str, namespace: str, name: str) -> Any | None:
        try:
            return self.request("GET", f"{_collection(api_version, plural, namespace)}/{name}")
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def list(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        selector: str | None = None,
        fields: str | None = None,
    ) -> Listed:
        """The objects the selectors select, and when the API server listed them."""
        query = [("labelSelector", selector)] if selector else []
        if fields:
            query.append(("fieldSelector", fields))
        data, headers = self._exchange(
            "GET", _collection(api_version, plural, namespace), query=query
        )
        return Listed(data.get("items") or [], http_date(headers.get("Date")))

    def get_task(self, namespace: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.get(TASK_API, n.PLURAL, namespace, name)
        return result

    # ---------------------------------------------------------------- writes
    def _write(
        self,
        kind: str,
        what: str,
        path: str,
        body: Any,
        content_type: str,
        query: Sequence[tuple[str, str]],
    ) -> Written:
        """PATCH ``path``; the answer, with the API server's warnings, which are heeded
        (:func:`_heed`): it takes a write whose fields it does not know, drops them, and
        says so only there."""
        answer, headers = self._exchange(
            "PATCH", path, body=body, query=[*query], content_type=content_type
        )
        said = warnings(headers)
        if said:
            _heed(kind, what, said)
        return Written(answer, said)

    def apply(self, obj: Mapping[str, Any]) -> Written:
        """Server-side apply with the operator's single field manager (force: we own these)."""
        return self._write(
            obj["kind"],
            _named(obj),
            _child_path(obj),
            obj,
            "application/apply-patch+yaml",
            [("fieldManager", self.field_manager), ("force", "true")],
        )

    def merge_patch(self, obj: Mapping[str, Any], patch: Mapping[str, Any]) -> Written:
        """JSON merge patch (RFC 7386) of the child ``obj`` names: a list in ``patch`` replaces
        the stored one whole, where server-side apply merges keyed lists item by item (see
        :func:`slm_operator.reconcile.replace_hand_edits`)."""
        return self._write(
            obj["kind"],
            _named(obj),
            _child_path(obj),
            patch,
            "application/merge-patch+json",
            [("fieldManager", self.field_manager)],
        )

    def delete(
        self, api_version: str, plural: str, namespace: str, name: str, uid: str = ""
    ) -> bool:
        """Delete a child by name; with ``uid``, only the object observed under that uid.

        Why the uid: names are deterministic, so between the read that decided on a deletion
        and the DELETE, the object may have been deleted and created again under the same
        name (by this operator's previous pass, or a replica that led before it) and is then
        new work that must not go. The API server checks the precondition atomically and
        answers 409 Conflict; that, like 404, means "nothing of ours left to delete".
        Returns whether this call deleted something.
        """
        options: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            self.request(
                "DELETE", f"{_collection(api_version, plural, namespace)}/{name}", body=options
            )
        except KubeError as e:
            if e.status == 404 or (uid and e.status == 409):
                return False
            raise
        return True

    def patch_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        resource_version: str | None = None,
    ) -> Written:
        """Merge-patch the AgentTask's status; with ``resource_version``, only onto that version.

        Why the resourceVersion and not the uid: the API server silently drops
        ``metadata.uid`` from a merge patch of a custom resource's status subresource (the
        status strategy keeps the stored metadata), so a uid in the body guards nothing. A
        resourceVersion in the body is honoured: the write is refused with 409 Conflict when
        the object changed since it was read, which includes "deleted and created again
        under the same name" (a new object never has an old resourceVersion).

        The answer's ``unknown_fields`` are status fields the task's CRD does not declare:
        the write is taken and they are pruned (an older CRD, see :data:`CRD_ADVICE`).
        """
        path = f"{_collection(TASK_API, n.PLURAL, namespace)}/{name}/status"
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self._write(
            n.KIND,
            f"AgentTask {namespace}/{name}",
            path,
            body,
            "application/merge-patch+json",
            [("fieldManager", self.field_manager)],
        )

    def event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about ``obj`` and log it; failures are logged, never raised.

        Why logged too: an Event expires after an hour, so what the operator decided during
        a night's incident was gone by morning, and its log held only kopf's per-handler
        "succeeded" lines. A Warning Event logs at WARNING, any other at INFO. The callers
        post an Event only when a condition changes, so a steady task logs nothing per pass.
        """
        meta = obj["metadata"]
        log.log(
            logging.WARNING if type_ == "Warning" else logging.INFO,
            "%s %s/%s: %s: %s",
            obj["kind"],
            meta["namespace"],
            meta["name"],
            reason,
            message,
        )
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": self.field_manager},
            "reportingComponent": self.field_manager,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", _collection("v1", "events", meta["namespace"]), body=body)
        except KubeError as e:
            log.warning(
                "could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], e
            )
