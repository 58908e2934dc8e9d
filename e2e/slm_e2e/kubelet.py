"""Playing the kubelet's part for trainer pods on fake nodes.

kwok runs no containers. When a trainer pod "finishes", a real kubelet would copy the
container's ``/dev/termination-log`` into ``state.terminated.message`` and set the pod phase;
tests and the demo do exactly that here, through the pod's status subresource, with the
result JSON the real trainer writes.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from slm_e2e.testing import ClusterHandle, wait_for


def running_pod(
    cluster: ClusterHandle, namespace: str, job: str, timeout: float = 60
) -> dict[str, Any]:
    """Wait for the Job's pod to be scheduled and Running; return it."""

    def find() -> dict[str, Any] | None:
        cp = cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", f"job-name={job}", "-o", "json", check=False
        )
        if cp.returncode != 0:
            return None
        for pod in json.loads(cp.stdout)["items"]:
            if pod.get("status", {}).get("phase") == "Running":
                return dict(pod)
        return None

    found: dict[str, Any] = wait_for(find, timeout=timeout, what=f"a Running pod of Job {job}")
    return found


def finish_pod(
    cluster: ClusterHandle, namespace: str, pod: dict[str, Any], message: str, exit_code: int = 0
) -> None:
    """Terminate the pod's trainer container with ``message`` as its termination message."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    container = pod["spec"]["containers"][0]
    started = (pod.get("status", {}).get("startTime")) or now
    status = {
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "PodCompleted",
                    "lastTransitionTime": now,
                }
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Completed" if exit_code == 0 else "Error",
                            "message": message,
                            "startedAt": started,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
    }
    cluster.kubectl(
        "patch",
        "pod",
        pod["metadata"]["name"],
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def complete_job(
    cluster: ClusterHandle,
    namespace: str,
    job: str,
    message: str,
    exit_code: int = 0,
    timeout: float = 60,
) -> dict[str, Any]:
    """Wait for the Job's pod, then finish it as the kubelet would; returns the pod."""
    pod = running_pod(cluster, namespace, job, timeout)
    finish_pod(cluster, namespace, pod, message, exit_code)
    return pod
