"""What a reconcile writes when the API server refuses a child, a child was edited by hand, or
the task changed meanwhile."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest
from test_plan import make_task
from test_reconcile_status import merge_patch

from slm_operator import builders as b
from slm_operator import conditions as c
from slm_operator import naming as n
from slm_operator import reconcile as rc
from slm_operator.kube import KubeError, TaskChanged
from slm_operator.observe import task_child

QUOTA = (
    'jobs.batch "weather-data-0123456789" is forbidden: exceeded quota: no-jobs, requested: '
    "count/jobs.batch=1, used: count/jobs.batch=0, limited: count/jobs.batch=0"
)


class Cluster:
    """Just enough of :class:`slm_operator.kube.Kube` for reconcile, refusing what it is told."""

    def __init__(self, task: dict[str, Any], refuse: KubeError | None = None) -> None:
        self.task, self.refuse = task, refuse
        self.applied: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.status_writes: list[dict[str, Any]] = []
        self.status_error: KubeError | None = None
        self.refuse_delete: KubeError | None = None
        self.deleted: list[str] = []
        self.jobs: list[dict[str, Any]] = []
        #: Objects ``get`` finds, by plural (one each: the task's Deployment and Service).
        self.objects: dict[str, dict[str, Any]] = {}
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.refuse_patch: KubeError | None = None
        self.refuse_deployment: KubeError | None = None

    def get_task(self, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.task)

    def get(self, api_version: str, plural: str, *_: Any) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(plural))

    def merge_patch(self, obj: dict[str, Any], patch: dict[str, Any]) -> None:
        self.patches.append((obj["kind"], copy.deepcopy(patch)))
        if self.refuse_patch is not None:
            raise self.refuse_patch
        plural = f"{obj['kind'].lower()}s"
        self.objects[plural] = merge_patch(self.objects.get(plural), patch)

    def list(self, api_version: str, plural: str, *_: Any, **__: Any) -> list[dict[str, Any]]:
        return copy.deepcopy(self.jobs) if plural == "jobs" else []

    def apply(self, obj: dict[str, Any]) -> None:
        if self.refuse is not None and obj["kind"] == "Job":
            raise self.refuse
        if self.refuse_deployment is not None and obj["kind"] == "Deployment":
            raise self.refuse_deployment
        self.applied.append(f"{obj['kind']}/{obj['metadata']['name']}")

    def delete(self, api_version: str, plural: str, namespace: str, name: str, uid: str) -> None:
        if self.refuse_delete is not None:
            raise self.refuse_delete
        self.deleted.append(name)

    def event(self, obj: Any, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def patch_status(
        self, namespace: str, name: str, status: Any, resource_version: str | None = None
    ) -> None:
        self.status_writes.append({"resourceVersion": resource_version})
        if self.status_error is not None:
            raise self.status_error
        self.task["status"] = merge_patch(self.task.get("status"), status)


def _task() -> dict[str, Any]:
    task = make_task()
    task["metadata"]["resourceVersion"] = "4711"
    return task


def _ready(task: dict[str, Any]) -> dict[str, Any]:
    found = c.find(task["status"]["conditions"], c.READY)
    assert found is not None
    return dict(found)


@pytest.mark.parametrize(
    ("status", "reason", "message"),
    [
        (403, "Forbidden", QUOTA),
        (400, "BadRequest", 'admission webhook "policy.example.com" denied the request: no GPUs'),
        (422, "Invalid", 'Job.batch "weather-data-0123456789" is invalid: spec.x: Forbidden'),
        # Server-side apply of a field an older Kubernetes lacks: a 500 no retry can help.
        (
            500,
            "InternalError",
            "failed to create typed patch object (agents/weather-data-0123456789; batch/v1, "
            "Kind=Job): .spec.podFailurePolicy.rules[0].bogus: field not declared in schema",
        ),
    ],
    ids=["quota", "webhook", "invalid", "field-not-in-schema"],
)
def test_a_child_the_api_server_refuses_is_named_in_ready_and_status_is_still_written(
    status: int, reason: str, message: str
) -> None:
    """A quota, an admission webhook or validation refuses the data-prep Job: retrying cannot
    help, someone has to act, so `kubectl get agenttask` says why (Ready=False ApplyFailed,
    in the API server's words, with a Warning event) instead of a status frozen at its last
    write while the operator retries in its log."""
    kube = Cluster(_task(), KubeError(status, message, reason))
    p = rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert p is not None and kube.status_writes
    ready = _ready(kube.task)
    assert (ready["status"], ready["reason"]) == (c.FALSE, c.APPLY_FAILED)
    assert message in ready["message"] and ready["message"].startswith("Job weather-data-")
    assert ("Warning", c.APPLY_FAILED) in {(t, r) for t, r, _ in kube.events}
    assert kube.task["status"]["revision"]["training"]  # the rest of the plan is written too
    # The data step says the Job was refused, in the API server's words, not "Job created".
    data = c.find(kube.task["status"]["conditions"], c.DATA_READY)
    assert data is not None and data["status"] == c.UNKNOWN
    assert "refused to create it" in data["message"] and message[:60] in data["message"]
    assert "Job created" not in data["message"]
    assert "refused to create it" in kube.task["status"]["message"]


IMMUTABLE = (
    'Job.batch "weather-data-0123456789" is invalid: spec.template: Invalid value: ...: '
    "field is immutable"
)


def test_a_job_name_taken_by_another_tasks_job_is_reported_not_waited_on() -> None:
    """Job names are task + stage + candidate + revision, so task "a" with candidate "b-data"
    and task "a-ft-b" can name a Job alike. The apply lands on the other task's Job and is
    refused as immutable; that was kept as this task's Job, which then waited for ever,
    "Job created, waiting for its pod to run"."""
    kube = Cluster(_task(), KubeError(422, IMMUTABLE, "Invalid"))
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    ready = _ready(kube.task)
    assert (ready["status"], ready["reason"]) == (c.FALSE, c.APPLY_FAILED)
    assert "belongs to something else" in ready["message"]
    data = c.find(kube.task["status"]["conditions"], c.DATA_READY)
    assert data is not None and "Job created" not in data["message"]


def _revision(task: dict[str, Any]) -> str:
    """The training revision the operator gives ``task``."""
    kube = Cluster(copy.deepcopy(task))
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    return str(kube.task["status"]["revision"]["training"])


def _holding_own_job(task: dict[str, Any], rev: str, refuse: KubeError) -> Cluster:
    """A cluster that holds ``task``'s data-prep Job of revision ``rev`` and refuses every
    Job apply with ``refuse``."""
    kube = Cluster(task, refuse)
    kube.jobs = [
        {
            "metadata": {
                "name": n.data_job_name("weather", rev),
                "labels": n.labels("weather", n.STAGE_PREPARE, rev),
                "ownerReferences": [{"uid": task["metadata"]["uid"]}],
            },
            "status": {"active": 1},
        }
    ]
    return kube


def test_this_tasks_own_job_refused_as_immutable_is_kept() -> None:
    """An older operator version built the revision's Job with another template: the same
    work, so it is kept and followed, not reported."""
    task = _task()
    kube = _holding_own_job(task, _revision(task), KubeError(422, IMMUTABLE, "Invalid"))
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    ready = _ready(kube.task)
    assert ready["reason"] != c.APPLY_FAILED, ready
    assert not [e for e in kube.events if e[1] == c.APPLY_FAILED]


def test_a_kept_job_gets_the_tasks_limits_though_its_template_is_an_older_operators() -> None:
    """The API server refuses a whole apply that changes an immutable pod template, the
    limits with it: a limit raised for a fine-tune about to run out of time never reached a
    Job an older operator had built, which died at the old limit. The limits alone are
    patched now; a patch refused is reported like any refused write."""
    task = _task()
    task["spec"]["training"] = {"activeDeadlineSeconds": 43200, "backoffLimit": 5}
    kube = _holding_own_job(task, _revision(task), KubeError(422, IMMUTABLE, "Invalid"))
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert ("Job", {"spec": {"activeDeadlineSeconds": 43200, "backoffLimit": 5}}) in kube.patches
    assert _ready(kube.task)["reason"] != c.APPLY_FAILED

    kube = _holding_own_job(task, _revision(task), KubeError(422, IMMUTABLE, "Invalid"))
    kube.refuse_patch = KubeError(403, "jobs.batch is forbidden: cannot patch", "Forbidden")
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert _ready(kube.task)["reason"] == c.APPLY_FAILED


def test_keeping_an_own_job_never_logs_the_dataset_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The API server's "field is immutable" answer dumps the whole new pod template, the
    data-prep Job's ``--input=<dataset URI>`` among its args, and it was logged as it came:
    a URI's credentials went into the operator's log. The log now names the Job alone."""
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    task = _task()
    task["spec"]["dataset"]["uri"] = f"s3://AKIAIOSFODNN7EXAMPLE:{secret}@calls-bucket/router/"
    rev = _revision(task)
    template = b.data_prep_job(task, rev)["spec"]["template"]
    assert secret in json.dumps(template)  # what the API server quotes holds it
    said = (
        f'Job.batch "{n.data_job_name("weather", rev)}" is invalid: spec.template: '
        f"Invalid value: {json.dumps(template)}: field is immutable"
    )
    kube = _holding_own_job(task, rev, KubeError(422, said, "Invalid"))
    with caplog.at_level(logging.DEBUG):
        rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert f"keeping existing Job {n.data_job_name('weather', rev)}" in caplog.text
    assert secret not in caplog.text
    assert _ready(kube.task)["reason"] != c.APPLY_FAILED


def test_a_refusal_message_is_bounded() -> None:
    kube = Cluster(_task(), KubeError(403, "denied: " + "x" * 50_000, "Forbidden"))
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert len(_ready(kube.task)["message"]) <= 1024


def test_a_retryable_refusal_is_retried_not_reported() -> None:
    """429 or 5xx: the API server is busy; the reconcile fails (and is retried) and the status
    does not flap to ApplyFailed."""
    kube = Cluster(_task(), KubeError(503, "etcd leader changed", "ServiceUnavailable"))
    with pytest.raises(KubeError) as raised:
        rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert raised.value.retryable
    ready = _ready(kube.task)  # the rest of the status is written first (see below)
    assert ready["reason"] != c.APPLY_FAILED and "etcd" not in ready["message"]


def test_a_busy_child_write_does_not_hold_back_the_fallback_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An admission webhook that is down answers every Deployment apply with a 500 (busy,
    retried). A serving task applies its Deployment on every pass, and the reconcile raised
    before the status: the SLO fallback and the route the gateway follows waited out the
    outage (with backoff up to 5 minutes) while agents got the breaching SLM's answers."""
    import datetime as dt

    import test_plan as tp

    from slm_operator.plan import Observed

    task, jobs, dep = tp._serving_task()
    t = tp.NOW
    for _ in range(20):
        t += dt.timedelta(seconds=10)
        tp._step(task, jobs, dep, t, tp.HEALTHY)
        if task["status"]["route"]["mode"] == "slm":
            break
    assert task["status"]["route"]["mode"] == "slm"
    t += dt.timedelta(seconds=10)
    tp._step(task, jobs, dep, t, tp.SLOW)  # one breached window of two
    task["metadata"]["resourceVersion"] = "42"
    t += dt.timedelta(seconds=10)
    obs = Observed(copy.deepcopy(task), jobs, dep, t, tp.SLOW)
    monkeypatch.setattr(rc, "observe", lambda *a, **k: obs)
    webhook = KubeError(500, 'failed calling webhook "validate.kyverno.svc"', "InternalError")

    kube = Cluster(task)
    kube.refuse_deployment = webhook
    with pytest.raises(KubeError) as raised:
        rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert raised.value.retryable and str(raised.value) == str(webhook)  # retried as before
    assert isinstance(raised.value, rc.ChildWriteBusy)
    assert raised.value.plan.status == kube.task["status"]  # what main goes on from
    assert kube.status_writes  # but the status went first
    fallback = c.find(kube.task["status"]["conditions"], c.FALLBACK_ACTIVE)
    assert fallback is not None and (fallback["status"], fallback["reason"]) == (
        c.TRUE,
        c.SLO_BREACHED,
    )
    assert kube.task["status"]["route"]["mode"] != "slm"
    assert "Service/weather-slm" in kube.applied  # the other children were applied too


def _abandoned_job(task: dict[str, Any]) -> dict[str, Any]:
    """A finished data Job of a revision the task no longer trains: the plan deletes it."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "weather-data-0000000000",
            "uid": "job-uid-1",
            "labels": {n.LABEL_TASK: "weather", n.LABEL_STAGE: "data", n.LABEL_REVISION: "old"},
            "ownerReferences": [{"uid": task["metadata"]["uid"], "kind": "AgentTask"}],
        },
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }


def test_a_deletion_the_api_server_refuses_is_named_in_ready_and_status_is_still_written() -> None:
    """RBAC without `delete` on Jobs (a hand-made Role): the refused DELETE stopped every pass
    before the status write, so `kubectl get agenttask` stayed at its last status while only
    the operator's log said why."""
    task = _task()
    kube = Cluster(task)
    kube.jobs = [_abandoned_job(task)]
    kube.refuse_delete = KubeError(
        403,
        'jobs.batch "weather-data-0000000000" is forbidden: User "system:serviceaccount:x:op" '
        'cannot delete resource "jobs"',
        "Forbidden",
    )
    p = rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert p is not None and p.delete_jobs == ["weather-data-0000000000"]
    assert kube.status_writes and not kube.deleted
    ready = _ready(kube.task)
    assert (ready["status"], ready["reason"]) == (c.FALSE, c.APPLY_FAILED)
    assert ready["message"].startswith("Job weather-data-0000000000 was refused: deleting it:")
    assert "cannot delete resource" in ready["message"]
    assert kube.task["status"]["revision"]["training"]  # the rest of the plan is written too

    kube.refuse_delete = KubeError(503, "etcd leader changed", "ServiceUnavailable")
    with pytest.raises(KubeError):  # busy, not refused: retried, not reported
        rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    kube.refuse_delete = None
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert kube.deleted == ["weather-data-0000000000"]
    assert _ready(kube.task)["reason"] != c.APPLY_FAILED


def test_status_is_written_only_onto_the_object_that_was_read() -> None:
    """Deleted and created again under the same name (or edited) while the reconcile ran: the
    status write names the resourceVersion it read, the API server refuses it with 409, and
    the reconcile fails retryably instead of leaving the old object's status on the new one."""
    kube = Cluster(_task())
    kube.status_error = KubeError(409, "the object has been modified", "Conflict")
    with pytest.raises(TaskChanged) as raised:
        rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert kube.status_writes == [{"resourceVersion": "4711"}]
    assert raised.value.retryable
    assert not kube.events  # nothing is announced about a status that was not written


def _ports(obj: dict[str, Any]) -> dict[str, int]:
    """Port number by name, of a Service or of a Deployment's containers."""
    if obj["kind"] == "Service":
        return {p["name"]: p["port"] for p in obj["spec"]["ports"]}
    containers = obj["spec"]["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for c_ in containers for p in c_.get("ports") or []}


class HandEdited(Cluster):
    """A cluster holding the task's Deployment and Service, as server-side apply treats them:
    a port edited by hand under another number stays beside the applied one (keyed lists are
    merged item by item), and the API server refuses the duplicate port name."""

    def apply(self, obj: dict[str, Any]) -> None:
        live = self.objects.get(f"{obj['kind'].lower()}s")
        if live is not None and _ports(live) != _ports(obj):
            where = "spec.ports[1]" if obj["kind"] == "Service" else "spec.template.spec."
            raise KubeError(
                422,
                f'{obj["kind"]} "weather-slm" is invalid: {where}...name: Duplicate value: "http"',
                "Invalid",
            )
        super().apply(obj)


def _served(task: dict[str, Any], dep: dict[str, Any]) -> dict[str, Any]:
    """The Triton Deployment ``task`` serves from, as the API server holds it: built by the
    operator (labels, owner) with ``dep``'s status."""
    facts = dep["metadata"]["annotations"]
    built = b.triton_deployment(
        task,
        facts[n.LABEL_REVISION],
        facts[n.ANNOTATION_ARTIFACT],
        facts[n.ANNOTATION_CANDIDATE],
        int(dep["spec"]["replicas"]),
    )
    built["metadata"]["generation"] = 1
    return {**built, "status": copy.deepcopy(dep["status"])}


def _serving_cluster(
    monkeypatch: pytest.MonkeyPatch, kube_type: type[Cluster] = HandEdited
) -> Cluster:
    """A cluster whose task serves, with its Deployment and Service as the operator built them."""
    import test_plan as tp

    from slm_operator.plan import Observed

    task, jobs, dep = tp._serving_task()
    task["metadata"]["resourceVersion"] = "42"
    kube = kube_type(task)
    kube.objects = {"deployments": _served(task, dep), "services": b.triton_service(task)}
    monkeypatch.setattr(
        rc,
        "observe",
        lambda *a, **k: Observed(
            copy.deepcopy(kube.task), jobs, kube.objects["deployments"], tp.NOW
        ),
    )
    return kube


@pytest.mark.parametrize(
    ("plural", "path"),
    [
        ("services", ("spec", "ports", 0, "port")),
        ("deployments", ("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort")),
    ],
    ids=["service-port", "container-port"],
)
def test_a_port_edited_by_hand_is_set_back_and_the_task_stays_ready(
    monkeypatch: pytest.MonkeyPatch, plural: str, path: tuple[Any, ...]
) -> None:
    """`kubectl patch` moved the Service's port 8000 to 9999 (or the container's to 9000):
    every apply after it added 8000 beside it and the API server refused the pair, so Ready
    stayed False (ApplyFailed) for good while the gateway's endpoint, port 8000, was dead.
    The hand edit is replaced with one merge patch of the built spec, and said so."""
    kube = _serving_cluster(monkeypatch)
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert _ready(kube.task)["status"] == c.TRUE
    edited: Any = kube.objects[plural]
    for key in path[:-1]:
        edited = edited[key]
    edited[path[-1]] = 9999

    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    ready = _ready(kube.task)
    assert (ready["status"], ready["reason"]) == (c.TRUE, c.READY_REASON), ready
    assert _ports(kube.objects[plural])["http"] == 8000  # the endpoint answers again
    assert [kind for kind, _ in kube.patches] == [kube.objects[plural]["kind"]]
    assert ("Warning", rc.HAND_EDIT_REPLACED) in {(t, r) for t, r, _ in kube.events}


def test_a_refusal_a_merge_patch_cannot_lift_stays_apply_failed_and_nothing_is_deleted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ValidatingAdmissionPolicy's denial is a 422 too: the merge patch is refused alike, and
    the task says why in the API server's words; the Service is not deleted and created again
    (that would turn a refused update into an outage)."""
    kube = _serving_cluster(monkeypatch)
    kube.objects["services"]["spec"]["ports"][0]["port"] = 9999
    policy = (
        'services "weather-slm" is forbidden: ValidatingAdmissionPolicy "no-edits" with '
        'binding "no-edits" denied request: ports are frozen'
    )
    kube.refuse_patch = KubeError(422, policy, "Invalid")
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    ready = _ready(kube.task)
    assert (ready["status"], ready["reason"]) == (c.FALSE, c.APPLY_FAILED)
    assert (
        ready["message"].startswith("Service weather-slm was refused: ")
        and "frozen" in ready["message"]
    )
    assert [kind for kind, _ in kube.patches] == ["Service"] and not kube.deleted
    assert rc.HAND_EDIT_REPLACED not in {r for _, r, _ in kube.events}


def test_someone_elses_service_is_not_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Service of the task's name that another owner holds is not the task's to rewrite."""
    kube = _serving_cluster(monkeypatch)
    foreign = kube.objects["services"]
    foreign["metadata"]["ownerReferences"] = [{"uid": "someone-else", "kind": "Application"}]
    foreign["spec"]["ports"][0]["port"] = 9999
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert _ready(kube.task)["reason"] == c.APPLY_FAILED and not kube.patches


def _foreign(kind: str) -> dict[str, Any]:
    """A ``kind`` named like the task's serving children that a user (``kubectl create service
    clusterip weather-slm``) or a Helm chart made: no ownerReferences, not the operator's
    labels."""
    spec: dict[str, Any] = (
        {"selector": {"app": "weather-slm"}, "ports": [{"name": "80-80", "port": 80}]}
        if kind == "Service"
        else {"selector": {"matchLabels": {"app": "weather-slm"}}, "replicas": 1}
    )
    return {
        "apiVersion": "v1" if kind == "Service" else "apps/v1",
        "kind": kind,
        "metadata": {"name": "weather-slm", "uid": "users-uid", "labels": {"app": "weather-slm"}},
        "spec": spec,
        "status": {},
    }


@pytest.mark.parametrize("kind", ["Service", "Deployment"])
def test_a_serving_child_name_someone_else_holds_is_never_applied(kind: str) -> None:
    """A Service (or Deployment) of the task's serving name made by a user or a Helm chart,
    with no ownerReferences: server-side apply with force took it over (its selector replaced,
    the Triton ports added, this task's ownerReference added), and the garbage collector then
    deleted it with the AgentTask. Ready said only the Deployment's immutable-selector
    refusal, if anything. It is left alone now, and Ready says whose name it is."""
    import test_plan as tp

    task, _, dep = tp._serving_task()
    task["metadata"]["resourceVersion"] = "42"
    kube = Cluster(task)
    kube.objects = {"deployments": _served(task, dep), "services": b.triton_service(task)}
    kube.objects[f"{kind.lower()}s"] = _foreign(kind)
    for _ in range(2):  # and again at the next pass, which sees the refusal in the status
        rc.reconcile(kube, "agents", "weather", tp.NOW)  # type: ignore[arg-type]
        assert f"{kind}/weather-slm" not in kube.applied
        assert not kube.patches
    other = "Deployment" if kind == "Service" else "Service"
    assert f"{other}/weather-slm" in kube.applied  # the rest is applied as usual
    ready = _ready(kube.task)
    assert (ready["status"], ready["reason"]) == (c.FALSE, c.APPLY_FAILED)
    assert ready["message"].startswith(f"{kind} weather-slm was refused: ")
    assert "belongs to something else" in ready["message"]
    assert f"rename this task or the {kind}" in ready["message"]
    # Serving names the clash too, not "waiting for replicas" (a foreign Deployment runs no
    # Triton pod of this task: it read as an outage that never ends), and nothing is routed.
    serving = c.find(kube.task["status"]["conditions"], c.SERVING)
    assert serving is not None and serving["reason"] == c.SERVICE_NAME_TAKEN, serving
    assert f"{kind} weather-slm belongs to something else" in serving["message"]
    route = kube.task["status"]["route"]
    assert route["mode"] == "llm" and "slmEndpoint" not in route


def test_the_gateway_is_not_sent_to_a_service_that_is_someone_elses() -> None:
    """The Service of the serving name was refused, but status.route still named it
    (``slmEndpoint: http://weather-slm.agents.svc:8000``, phase Serving, route shadow): the
    gateway sent shadow copies of the agents' calls to whatever pods that Service selects."""
    import test_plan as tp

    task, _, dep = tp._serving_task()
    task["metadata"]["resourceVersion"] = "42"
    kube = Cluster(task)
    kube.objects = {"deployments": _served(task, dep), "services": _foreign("Service")}
    for _ in range(2):
        rc.reconcile(kube, "agents", "weather", tp.NOW)  # type: ignore[arg-type]
        status = kube.task["status"]
        assert status["route"]["mode"] == "llm" and "slmEndpoint" not in status["route"]
        assert "Service weather-slm" in status["route"]["reason"]
        assert status["phase"] != "Serving"
        serving = c.find(status["conditions"], c.SERVING)
        assert serving is not None and serving["status"] == c.FALSE
        assert "Service weather-slm" in serving["message"]
        assert _ready(kube.task)["reason"] == c.APPLY_FAILED
    assert "Deployment/weather-slm" in kube.applied  # the model's replicas are kept


def _left_by_a_deleted_task(task: dict[str, Any]) -> Cluster:
    """A cluster where ``task`` was deleted and created again under its name before the
    garbage collector removed its Deployment and Service: they are the operator's, built for
    ``weather``, but owned by the deleted task's uid."""
    import test_plan as tp

    _, _, dep = tp._serving_task()
    deleted = copy.deepcopy(task)
    deleted["metadata"]["uid"] = "uid-of-the-deleted-weather"
    kube = Cluster(task)
    kube.objects = {"deployments": _served(deleted, dep), "services": b.triton_service(deleted)}
    return kube


def test_the_children_a_deleted_task_of_the_same_name_left_are_taken_over() -> None:
    """``kubectl delete agenttask weather`` then ``kubectl apply`` again, faster than the
    garbage collector: the old Deployment and Service still name the old uid. Server-side
    apply takes them over (the ownerReference replaced), as it always did; they were called
    someone else's instead, never applied, and Ready said ApplyFailed "belongs to something
    else (made by hand or by another tool?)"."""
    import test_plan as tp

    task, _, _ = tp._serving_task()
    task["metadata"]["resourceVersion"] = "42"
    kube = _left_by_a_deleted_task(task)
    rc.reconcile(kube, "agents", "weather", tp.NOW)  # type: ignore[arg-type]
    assert {"Deployment/weather-slm", "Service/weather-slm"} <= set(kube.applied)
    ready = _ready(kube.task)
    assert ready["reason"] != c.APPLY_FAILED, ready
    assert "belongs to something else" not in kube.task["status"]["route"]["reason"]


@pytest.mark.parametrize(
    "made_by",
    ["another-kind-owns-it", "another-task-owns-it", "a-second-owner", "not-the-operators"],
)
def test_a_child_that_only_looks_like_a_deleted_tasks_stays_someone_elses(made_by: str) -> None:
    """Only the operator's labels for this task name and AgentTask owners of this name make
    an object the task's earlier incarnation: anything else is someone else's, left alone."""
    import test_plan as tp

    task, _, _ = tp._serving_task()
    task["metadata"]["resourceVersion"] = "42"
    kube = _left_by_a_deleted_task(task)
    svc = kube.objects["services"]
    refs = svc["metadata"]["ownerReferences"]
    if made_by == "another-kind-owns-it":
        refs[0].update(apiVersion="argoproj.io/v1alpha1", kind="Application")
    elif made_by == "another-task-owns-it":
        refs[0]["name"] = "forecast"
    elif made_by == "a-second-owner":
        refs.append({"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "cm-uid"})
    else:
        svc["metadata"]["labels"] = {"app": "weather-slm"}
    rc.reconcile(kube, "agents", "weather", tp.NOW)  # type: ignore[arg-type]
    assert "Service/weather-slm" not in kube.applied
    assert "Deployment/weather-slm" in kube.applied  # the deleted task's, taken over
    ready = _ready(kube.task)
    assert ready["reason"] == c.APPLY_FAILED and ready["message"].startswith("Service ")


LIMIT_RANGE = (
    'pods "weather-slm-6f859965cb-zgtrn" is forbidden: [maximum cpu usage per Container is 2, '
    "but limit is 4, maximum memory usage per Container is 4Gi, but limit is 8Gi]"
)


def test_triton_pods_admission_refuses_say_why_in_serving_and_ready() -> None:
    """A LimitRange whose max is below serving.resources.limits (or a quota) refuses every
    Triton pod: there is no pod to read a reason from, and Serving and Ready said only
    "waiting for Triton replicas of revision X to become ready (0/1)" for good. The
    ReplicaSet controller's reason is on the Deployment (ReplicaFailure), without the
    refused pod's generated name, new on every retry."""
    import test_plan as tp

    task, _, dep = tp._serving_task()
    task["metadata"]["resourceVersion"] = "42"
    live = _served(task, tp._with_replicas(dep, 1, 0))
    live["status"]["conditions"] = [
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": ""},
    ]
    kube = Cluster(task)
    kube.objects = {"deployments": live, "services": b.triton_service(task)}
    said = []
    for pod in ("weather-slm-6f859965cb-zgtrn", "weather-slm-6f859965cb-4jr4v"):
        live["status"]["conditions"][1]["message"] = LIMIT_RANGE.replace(
            "weather-slm-6f859965cb-zgtrn", pod
        )
        rc.reconcile(kube, "agents", "weather", tp.NOW)  # type: ignore[arg-type]
        serving = c.find(kube.task["status"]["conditions"], c.SERVING)
        assert serving is not None and serving["status"] == c.FALSE
        said.append(serving["message"])
    assert said[0] == said[1]  # the same reason, whatever pod was refused last
    assert said[0].endswith(
        "(0/1); cannot create its pods: pods is forbidden: [maximum cpu usage per Container "
        "is 2, but limit is 4, maximum memory usage per Container is 4Gi, but limit is 8Gi]"
    ), said[0]
    assert "maximum cpu usage per Container is 2" in _ready(kube.task)["message"]


GPU_QUOTA = (
    'deployments.apps "weather-slm" is forbidden: exceeded quota: gpus, requested: '
    "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4"
)


@pytest.mark.parametrize(
    "refusal",
    [
        KubeError(403, GPU_QUOTA, "Forbidden"),
        KubeError(422, 'deployments.apps "weather-slm" is forbidden: policy says no', "Invalid"),
        KubeError(500, 'failed calling webhook "validate.kyverno.svc"', "InternalError"),
    ],
    ids=["quota", "policy", "webhook-down"],
)
def test_a_new_revision_whose_deployment_is_refused_is_not_shown_served(
    monkeypatch: pytest.MonkeyPatch, refusal: KubeError
) -> None:
    """A retrained revision passed and exported, and the Deployment's update to it was refused
    (a GPU quota, a policy) or not answered: status said the new revision served (revision,
    selectedModel, Serving, the route) and the served revision's Jobs were deleted, while the
    old pods went on serving. It stays a revision in training until its Deployment is taken."""
    import test_plan as tp

    from slm_operator.plan import Observed, plan

    task = make_task()
    old_rev = n.revision_of(task["spec"])
    old_jobs = tp.jobs_through(task, "export")
    dep = _served(task, tp.deployment(old_rev))
    task["status"] = plan(Observed(task, old_jobs, dep, tp.NOW)).status
    task["spec"]["candidates"][0]["epochs"] = 5
    task["metadata"].update(generation=2, resourceVersion="43")
    new_rev = n.revision_of(task["spec"])
    jobs = {**old_jobs, **tp.jobs_through(task, "export")}
    monkeypatch.setattr(
        rc, "observe", lambda *a, **k: Observed(copy.deepcopy(task), jobs, dep, tp.NOW)
    )

    kube = Cluster(task)
    kube.refuse_deployment = refusal
    kube.objects = {"deployments": dep}
    kube.refuse_patch = refusal  # a policy refuses the repair alike
    try:
        rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    except KubeError as e:
        assert e.retryable and refusal.retryable  # busy: retried, once the status is written
    status = kube.task["status"]
    assert status["revision"] == {"active": old_rev, "training": new_rev}
    assert status["selectedModel"]["revision"] == old_rev
    serving = c.find(status["conditions"], c.SERVING)
    assert serving is not None and serving["status"] == c.TRUE and old_rev in serving["message"]
    assert new_rev not in json.dumps(status["route"])
    assert not kube.deleted  # the served revision's Jobs are kept
    if not refusal.retryable:
        ready = _ready(kube.task)
        assert ready["reason"] == c.APPLY_FAILED and "Deployment weather-slm" in ready["message"]


@pytest.mark.parametrize("owner", ["", "someone-else"], ids=["removed", "another-owner"])
def test_a_deployment_whose_owner_reference_was_removed_by_hand_is_still_the_tasks(
    owner: str,
) -> None:
    """ownerReferences removed from the Triton Deployment by hand (`kubectl edit`, a tool that
    strips them): the pass that saw it read "no Deployment", sent the route to the LLM and
    posted a Warning NoReadyReplicas while every replica stayed ready, and its own apply put
    the reference back. Labelled by the operator for this task and owned by no one, it is the
    task's; one that names another owner stays someone else's."""
    import test_plan as tp

    task, _, dep = tp._serving_task()
    task["metadata"]["resourceVersion"] = "42"
    kube = Cluster(task)
    kube.objects = {"deployments": _served(task, dep)}
    rc.reconcile(kube, "agents", "weather", tp.NOW)  # type: ignore[arg-type]
    before, posted = copy.deepcopy(kube.task["status"]), len(kube.events)
    assert _ready(kube.task)["status"] == c.TRUE

    kube.objects["deployments"]["metadata"]["ownerReferences"] = (
        [{"uid": owner, "kind": "Application", "name": "x"}] if owner else []
    )
    rc.reconcile(kube, "agents", "weather", tp.NOW)  # type: ignore[arg-type]
    serving = c.find(kube.task["status"]["conditions"], c.SERVING)
    assert serving is not None
    if owner:
        assert serving["status"] != c.TRUE  # not this task's Deployment
        return
    assert kube.task["status"] == before and len(kube.events) == posted
    assert serving["status"] == c.TRUE and kube.task["status"]["route"]["mode"] != "llm"


def test_a_service_read_that_is_busy_retries_the_pass_instead_of_refusing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a Service's 422 the operator reads the Service to see whose it is; a busy answer
    to that read made the repairable edit read as refused for good (Ready False ApplyFailed,
    a Warning) until the next resync, instead of a retry."""

    class BusyRead(HandEdited):
        busy_reads = 1

        def get(self, api_version: str, plural: str, *rest: Any) -> Any:
            if plural == "services" and self.busy_reads:
                self.busy_reads -= 1
                raise KubeError(503, "etcdserver: request timed out", "ServiceUnavailable")
            return super().get(api_version, plural, *rest)

    kube = _serving_cluster(monkeypatch, BusyRead)
    kube.objects["services"]["spec"]["ports"][0]["port"] = 9999
    with pytest.raises(rc.ChildWriteBusy):
        rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert _ready(kube.task)["status"] == c.TRUE
    assert c.APPLY_FAILED not in {r for _, r, _ in kube.events}
    rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]  # the retry repairs it
    assert _ports(kube.objects["services"])["http"] == 8000


def test_a_hand_edit_replaced_before_a_busy_apply_is_said_and_its_revision_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Revision 2 exported while the container port was edited by hand: the merge patch wrote
    revision 2's Deployment and the apply after it was busy. The status said revision 1 still
    served, and HandEditReplaced was never posted (the retry found nothing to replace)."""
    import test_plan as tp

    from slm_operator.plan import Observed, plan

    task = tp.make_task()
    task["metadata"]["resourceVersion"] = "1"
    rev1 = n.revision_of(task["spec"])
    jobs = dict(tp.jobs_through(task, "export"))
    live = _served(task, tp.deployment(rev1))
    task["status"] = plan(Observed(task, jobs, live, tp.NOW)).status
    task["spec"]["candidates"][0]["epochs"] = 5
    task["metadata"]["generation"] = 2
    rev2 = n.revision_of(task["spec"])
    jobs.update(tp.jobs_through(task, "export"))

    class BusyAfterPatch(HandEdited):
        deployment_applies = 0

        def apply(self, obj: dict[str, Any]) -> None:
            if obj["kind"] == "Deployment":
                self.deployment_applies += 1
                if self.deployment_applies == 2:  # the apply right after the merge patch
                    raise KubeError(503, "etcdserver: leader changed", "ServiceUnavailable")
            super().apply(obj)

    kube = BusyAfterPatch(task)
    kube.objects = {"deployments": live, "services": None}
    live["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 9000
    monkeypatch.setattr(
        rc,
        "observe",
        lambda *a, **k: Observed(
            copy.deepcopy(kube.task), jobs, copy.deepcopy(kube.objects["deployments"]), tp.NOW
        ),
    )
    with pytest.raises(rc.ChildWriteBusy):
        rc.reconcile(kube, "agents", "weather")  # type: ignore[arg-type]
    assert kube.objects["deployments"]["metadata"]["annotations"][n.LABEL_REVISION] == rev2
    assert kube.task["status"]["revision"]["active"] == rev2
    assert ("Warning", rc.HAND_EDIT_REPLACED) in {(t, r) for t, r, _ in kube.events}


def test_an_orphaned_deployment_is_a_new_tasks_only_if_its_status_serves_that_revision() -> None:
    """`kubectl delete agenttask --cascade=orphan`, then the same task applied again (new uid,
    no status): its first pass took the old Deployment for its own, so nothing trained, no
    model was selected and the route served every SLM answer at threshold 0. An ownerless
    Deployment is the task's only when the task's status names the revision it serves (its
    ownerReferences removed by hand)."""
    import test_plan as tp

    task = tp.make_task()
    rev = n.revision_of(task["spec"])
    orphan = _served(task, tp.deployment(rev))
    orphan["metadata"]["ownerReferences"] = []
    uid = task["metadata"]["uid"]
    assert task_child(orphan, "weather", uid, serves=rev)
    assert not task_child(orphan, "weather", uid, serves="")  # a new task: no status yet
    assert not task_child(orphan, "weather", uid, serves="0123456789")
    assert not task_child(orphan, "other", uid, serves=rev)
