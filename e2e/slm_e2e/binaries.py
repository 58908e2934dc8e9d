"""Where the locally built control-plane binaries live, and whether they are complete.

The build itself is ``e2e/build-binaries.sh`` (Go toolchain, module proxy). This module only
resolves paths from the pinned versions in ``e2e/versions.env`` so that the cluster tool, the
tests and the demo agree on one cache without hard-coding versions twice.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parent.parent
VERSIONS_FILE = E2E_DIR / "versions.env"
BUILD_SCRIPT = E2E_DIR / "build-binaries.sh"


class BinariesMissing(RuntimeError):
    """The control-plane binaries are not built (or only half built)."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        versions[key.strip()] = value.strip()
    return versions


def cache_root() -> Path:
    """The cache build-binaries.sh builds into, made absolute as the script makes it: a
    relative ``SLM_FLEET_CACHE`` names a folder under the current directory, and the cluster
    hands these paths to processes that run elsewhere (``cwd`` is the cluster's folder)."""
    if os.environ.get("SLM_FLEET_CACHE"):
        return Path(os.environ["SLM_FLEET_CACHE"]).resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(base) / "slm-fleet").resolve()


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of every binary the local control plane needs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    kwok_stages: Path
    helm: Path

    @property
    def kubernetes_version(self) -> str:
        return read_versions()["KUBERNETES_VERSION"]


def kubernetes_minor(version: str) -> str:
    """``36`` for ``v1.36.3``: what build-binaries.sh's ``kube_minor`` says."""
    return version.removeprefix("v1.").split(".")[0]


def component_dirs() -> dict[str, Path]:
    v = read_versions()
    root = cache_root() / "bin"
    # helm has the Kubernetes minor baked in (for .Capabilities and `helm lint`), so its
    # folder names it: a bumped KUBERNETES_VERSION needs a helm of its own.
    helm = f"helm-{v['HELM_VERSION']}-k8s1.{kubernetes_minor(v['KUBERNETES_VERSION'])}"
    return {
        "kubernetes": root / f"kubernetes-{v['KUBERNETES_VERSION']}",
        "etcd": root / f"etcd-{v['ETCD_VERSION']}",
        "kwok": root / f"kwok-{v['KWOK_VERSION']}",
        "helm": root / helm,
    }


CLUSTER_COMPONENTS = ("kubernetes", "etcd", "kwok")


def missing_components(names: tuple[str, ...] | None = None) -> list[str]:
    """Components whose folder lacks the ``.complete`` stamp the build writes last."""
    return [
        name
        for name, d in component_dirs().items()
        if (names is None or name in names) and not (d / ".complete").is_file()
    ]


def go_available() -> bool:
    return shutil.which("go") is not None or Path("/usr/local/go/bin/go").is_file()


def locate(need: tuple[str, ...] = CLUSTER_COMPONENTS) -> Binaries:
    """Return the binaries, or raise BinariesMissing with the command that builds them.

    Only the components in ``need`` must be complete (the cluster needs no helm).
    """
    missing = missing_components(need)
    if missing:
        hint = (
            f"run 'make setup' (or 'bash {BUILD_SCRIPT}') to build them"
            if go_available()
            else "the Go toolchain (>= 1.26) is needed to build them: install Go, then run "
            "'make setup'"
        )
        raise BinariesMissing(
            f"control-plane binaries not built: {', '.join(missing)} under {cache_root()}/bin; "
            + hint
        )
    d = component_dirs()
    k = d["kubernetes"]
    return Binaries(
        etcd=d["etcd"] / "etcd",
        kube_apiserver=k / "kube-apiserver",
        kube_controller_manager=k / "kube-controller-manager",
        kube_scheduler=k / "kube-scheduler",
        kubectl=k / "kubectl",
        kwok=d["kwok"] / "kwok",
        kwok_stages=d["kwok"] / "stages",
        helm=d["helm"] / "helm",
    )
