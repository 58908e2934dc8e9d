"""Which objects the operator's watches receive: only the children it builds."""

from __future__ import annotations

import re

import kopf
from kopf._cogs.structs.references import Resource
from test_plan import NOW, _serving_task, make_task

from slm_operator import main
from slm_operator import naming as n
from slm_operator.plan import Observed, plan


def _selects(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector matching, for the two forms the operator uses: ``k=v`` and
    ``k in (a,b)``."""
    for requirement in re.findall(r"[^,(]+(?:\([^)]*\))?", selector):
        key, sep, values = requirement.partition(" in ")
        if sep:
            if labels.get(key.strip()) not in values.strip("() ").split(","):
                return False
        else:
            k, v = requirement.split("=", 1)
            if labels.get(k) != v:
                return False
    return True


def test_child_watches_are_label_selected_by_the_api_server_and_listed_in_chunks() -> None:
    """A handler's ``labels=`` is applied by kopf after the object arrived: without a
    selector on the watch itself the operator lists and watches every pod, Job and
    Deployment of its namespaces (of the cluster, with cluster-wide RBAC), and 20 000 pods
    are about a GiB, twice the chart's memory limit."""
    settings = kopf.OperatorSettings()
    main.configure(settings)
    selectors = settings.watching.label_selectors
    managed = f"{n.MANAGED_BY}={n.FIELD_MANAGER}"
    assert selectors.collect(Resource("batch", "v1", "jobs")) == [managed]
    assert selectors.collect(Resource("apps", "v1", "deployments")) == [managed]
    assert selectors.collect(Resource("", "v1", "pods")) == [
        f"{managed},{n.LABEL_COMPONENT} in (trainer,triton)"
    ]
    assert selectors.collect(Resource(n.GROUP, n.VERSION, n.PLURAL)) == []  # every AgentTask
    assert settings.watching.chunk_size and settings.watching.chunk_size <= 1000


def test_what_the_operator_builds_is_what_its_watches_select() -> None:
    """A label the builders stop setting would silently stop the task's reactions to its
    Jobs, trainer pods or Deployment (until the next resync)."""
    settings = kopf.OperatorSettings()
    main.configure(settings)
    sel = settings.watching.label_selectors
    job_sel = sel.collect(Resource("batch", "v1", "jobs"))[0]
    pod_sel = sel.collect(Resource("", "v1", "pods"))[0]
    dep_sel = sel.collect(Resource("apps", "v1", "deployments"))[0]

    jobs = [o for o in plan(Observed(make_task(), {}, None, NOW)).apply if o["kind"] == "Job"]
    assert jobs
    for job in jobs:
        assert _selects(job_sel, job["metadata"]["labels"])
        assert _selects(pod_sel, job["spec"]["template"]["metadata"]["labels"])
    task, jobs_done, dep = _serving_task()
    built = plan(Observed(task, jobs_done, dep, NOW)).apply
    deps = [o for o in built if o["kind"] == "Deployment"]
    assert deps and all(_selects(dep_sel, d["metadata"]["labels"]) for d in deps)
    # Triton's pods are watched too: a scheduler's verdict on one changes no Deployment.
    assert _selects(pod_sel, deps[0]["spec"]["template"]["metadata"]["labels"])
    # ...and nothing else: a pod of the operator's own chart (or anyone's) is not selected.
    assert not _selects(pod_sel, {n.MANAGED_BY: n.FIELD_MANAGER, n.LABEL_COMPONENT: "gateway"})
    assert not _selects(pod_sel, {n.LABEL_COMPONENT: "triton"})


def test_kopf_applies_the_same_pod_filter_to_what_the_watch_delivers() -> None:
    """The pod handler's own filter must agree with the server-side selector, or kopf drops
    the Triton pods' events the API server sends."""
    handlers = {h.id: h for h in kopf.get_default_registry()._watching.get_all_handlers()}
    labels = handlers["on_pod"].labels
    assert labels is main.POD_FILTER
    component = labels[n.LABEL_COMPONENT]
    assert callable(component)
    assert component("trainer") and component("triton")
    assert not component("gateway") and not component(None)
    assert labels[n.MANAGED_BY] == n.FIELD_MANAGER
