"""Thin adapter over the Kubernetes API: get, list, server-side apply, delete, status, events.

Why not the typed client classes: the operator handles five kinds as plain dicts (that is what
the pure builders produce and the planner reads), and one generic request path keeps retries,
error mapping and server-side apply in one place. Authentication, TLS and proxies still come
from the official ``kubernetes`` client's configuration.
"""

from __future__ import annotations

import copy
import datetime as dt
import email.utils
import json
import logging
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client, config

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


class KubeError(Exception):
    """An API call failed. ``retryable`` says whether backing off and retrying can help."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.status in (0, 409, 429) or self.status >= 500


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
            raise KubeError(0, str(exc), "ConnectionError") from exc
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
    def apply(self, obj: Mapping[str, Any]) -> Any:
        """Server-side apply with the operator's single field manager (force: we own these)."""
        return self.request(
            "PATCH",
            _child_path(obj),
            body=obj,
            content_type="application/apply-patch+yaml",
            query=[("fieldManager", self.field_manager), ("force", "true")],
        )

    def merge_patch(self, obj: Mapping[str, Any], patch: Mapping[str, Any]) -> Any:
        """JSON merge patch (RFC 7386) of the child ``obj`` names: a list in ``patch`` replaces
        the stored one whole, where server-side apply merges keyed lists item by item (see
        :func:`slm_operator.reconcile.replace_hand_edits`)."""
        return self.request(
            "PATCH",
            _child_path(obj),
            body=patch,
            content_type="application/merge-patch+json",
            query=[("fieldManager", self.field_manager)],
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
    ) -> Any:
        """Merge-patch the AgentTask's status; with ``resource_version``, only onto that version.

        Why the resourceVersion and not the uid: the API server silently drops
        ``metadata.uid`` from a merge patch of a custom resource's status subresource (the
        status strategy keeps the stored metadata), so a uid in the body guards nothing. A
        resourceVersion in the body is honoured: the write is refused with 409 Conflict when
        the object changed since it was read, which includes "deleted and created again
        under the same name" (a new object never has an old resourceVersion).
        """
        path = f"{_collection(TASK_API, n.PLURAL, namespace)}/{name}/status"
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self.request(
            "PATCH",
            path,
            body=body,
            content_type="application/merge-patch+json",
            query=[("fieldManager", self.field_manager)],
        )

    def event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about ``obj``; failures are logged, never raised."""
        meta = obj["metadata"]
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
