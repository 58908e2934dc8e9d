"""e2e/build-binaries.sh: two builds into one cache take turns instead of deleting each
other's work."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slm_e2e import binaries
from slm_e2e.binaries import component_dirs
from slm_e2e.testing import wait_for

SCRIPT = Path(__file__).resolve().parents[2] / "e2e" / "build-binaries.sh"


def _version(key: str) -> str:
    """A pinned version from e2e/versions.env (``HELM_VERSION``, ``ETCD_VERSION``...)."""
    for line in (SCRIPT.parent / "versions.env").read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError(f"{key} not in versions.env")


def test_a_second_build_waits_for_the_first_then_finds_the_binaries_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (Path("/usr/local/go/bin/go").exists() or shutil.which("go")):
        pytest.skip("the script needs the Go toolchain")
    if not shutil.which("flock"):
        pytest.skip("flock (util-linux) is not installed: the script builds without a lock")
    cache = tmp_path / "cache"
    # What the first build will have left when it is done: a finished helm folder.
    monkeypatch.setenv("SLM_FLEET_CACHE", str(cache))
    done = component_dirs()["helm"]
    done.mkdir(parents=True)
    env = {**os.environ, "SLM_FLEET_CACHE": str(cache)}
    with open(cache / "build.lock", "w") as first:
        fcntl.flock(first, fcntl.LOCK_EX)  # the first build, still running
        log = tmp_path / "second.log"
        with log.open("w") as out:
            second = subprocess.Popen(
                ["bash", str(SCRIPT), "helm"], env=env, stderr=out, start_new_session=True
            )
        try:
            wait_for(
                lambda: "waiting for it to finish" in log.read_text(),
                timeout=30,
                what="the second build to say it waits",
            )
            time.sleep(1.0)
            assert second.poll() is None, "the second build went on while the first held the lock"
            (done / ".complete").write_text("2026-12-02T00:00:00Z\n")
            fcntl.flock(first, fcntl.LOCK_UN)
            assert second.wait(timeout=30) == 0, log.read_text()
        finally:
            if second.poll() is None:  # a failed check: it must not go on to build helm
                os.killpg(second.pid, signal.SIGKILL)
                second.wait(timeout=10)
    text = log.read_text()
    assert "cached" in text and "redoing" not in text, text


# ---------------------------------------------------------------- stand-ins, no real build
SYSDEPS = SCRIPT.parent / "install-system-deps.sh"

#: A `go` that compiles nothing: `go build -o OUT` creates OUT relative to the current folder,
#: as the real one does; `go install` puts in $GOBIN a "binary" that holds its -ldflags (what
#: it would have baked in); `go mod download` fails as it does when the module proxy is down.
GO_STANDIN = """#!/bin/sh
case "$1" in
  version) echo "go version go1.26.0 linux/amd64 (stand-in)";;
  mod) [ "$2" = download ] || exit 0
       echo '{"Path": "k8s.io/kubernetes",'
       echo ' "Error": "dial tcp 127.0.0.1:9: connect: connection refused"}'
       exit 1;;
  build) out=""; prev=""
         for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
         mkdir -p "$(dirname "$out")"; : > "$out"; chmod +x "$out";;
  install) ld=""; prev=""
         for a in "$@"; do [ "$prev" = "-ldflags" ] && ld="$a"; prev="$a"; done
         name="${prev%@*}"; name="${name##*/}"
         mkdir -p "$GOBIN"; echo "$ld" > "$GOBIN/$name"; chmod +x "$GOBIN/$name";;
esac
"""

#: An `ldconfig -p` whose listing names libpython3.11 first, then goes on for about 1 MB:
#: far more than a pipe holds, so it is still writing when a reader has seen the match.
LDCONFIG_STANDIN = """#!/bin/sh
echo "20001 libs found in cache '/etc/ld.so.cache'"
echo "	libpython3.11.so.1.0 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"
i=0
while [ $i -lt 20000 ]; do
  echo "	libfiller$i.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libfiller$i.so.1"
  i=$((i + 1))
done
"""


def _stand_ins(where: Path, scripts: dict[str, str]) -> dict[str, str]:
    """Executables named after ``scripts``' keys in ``where``; the environment that puts
    them first on PATH."""
    where.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (where / name).write_text(text)
        (where / name).chmod(0o755)
    return {**os.environ, "PATH": f"{where}{os.pathsep}{os.environ['PATH']}"}


def test_a_relative_cache_is_built_into_that_folder_of_the_current_directory(
    tmp_path: Path,
) -> None:
    env = _stand_ins(tmp_path / "stand-ins", {"go": GO_STANDIN})
    env["SLM_FLEET_CACHE"] = "relcache"
    cp = subprocess.run(
        ["bash", str(SCRIPT), "etcd"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert cp.returncode == 0, cp.stderr
    built = tmp_path / "relcache" / "bin" / f"etcd-{_version('ETCD_VERSION')}"
    assert (built / "etcd").is_file() and (built / ".complete").is_file(), cp.stderr


def test_a_kubernetes_bump_gets_a_helm_built_for_the_new_minor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helm is built with the Kubernetes minor baked in (.Capabilities, `helm lint`) but was
    cached by HELM_VERSION alone: after a KUBERNETES_VERSION bump the build said "cached" and
    the tools kept a helm that rendered charts for the old minor."""
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    shutil.copy(SCRIPT, e2e / SCRIPT.name)
    versions = (SCRIPT.parent / "versions.env").read_text()
    env = _stand_ins(tmp_path / "stand-ins", {"go": GO_STANDIN})
    env["SLM_FLEET_CACHE"] = str(tmp_path / "cache")
    for kube in ("v1.36.3", "v1.37.0"):  # a helm built, then Kubernetes bumped
        bumped = "".join(
            f"KUBERNETES_VERSION={kube}\n" if line.startswith("KUBERNETES_VERSION=") else line
            for line in versions.splitlines(keepends=True)
        )
        (e2e / "versions.env").write_text(bumped)
        argv = ["bash", str(e2e / SCRIPT.name), "helm"]
        cp = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
    helm = _helm_of(e2e / "versions.env", tmp_path / "cache", monkeypatch)
    assert "helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37" in helm, cp.stderr


def _helm_of(versions: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What the tools (tests, chart checks) find as helm for ``versions``: here the stand-in's
    record of the flags it was built with."""
    read = binaries.read_versions
    monkeypatch.setattr(binaries, "read_versions", lambda path=versions: read(path))
    monkeypatch.setenv("SLM_FLEET_CACHE", str(cache))
    return binaries.locate(("helm",)).helm.read_text()


def test_the_cache_root_of_the_cluster_tool_is_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster starts its components in its own folder: a relative path would name a
    different place there than the one the build script used."""
    from slm_e2e.binaries import cache_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLM_FLEET_CACHE", "relcache")
    assert cache_root() == tmp_path.resolve() / "relcache"


def test_an_unreachable_module_proxy_is_reported_with_go_s_own_error(tmp_path: Path) -> None:
    env = _stand_ins(tmp_path / "stand-ins", {"go": GO_STANDIN})
    env["SLM_FLEET_CACHE"] = str(tmp_path / "cache")
    cp = subprocess.run(
        ["bash", str(SCRIPT), "kubernetes"], env=env, capture_output=True, text=True, timeout=60
    )
    assert cp.returncode != 0
    assert "KeyError" not in cp.stderr, cp.stderr
    assert "go mod download -json k8s.io/kubernetes@" in cp.stderr, cp.stderr
    assert "connect: connection refused" in cp.stderr, cp.stderr


def _can_shadow_files() -> bool:
    """Whether this machine lets an ordinary user bind-mount over a file in a private mount
    namespace (unshare); some distributions restrict unprivileged user namespaces."""
    if not shutil.which("unshare"):
        return False
    argv = ["unshare", "--mount", "--map-root-user", "true"]
    return subprocess.run(argv, capture_output=True).returncode == 0


def test_system_deps_see_libpython_in_a_listing_longer_than_a_pipe_holds(
    tmp_path: Path,
) -> None:
    """``ldconfig -p | grep -q`` under pipefail: grep stops at the match, ldconfig dies of
    SIGPIPE, and the failed pipeline read as "libpython3.11 missing" (now and then with the
    real listing; always with this long one)."""
    calls = tmp_path / "apt-calls"
    record = f'#!/bin/sh\necho "$(basename "$0") $*" >> {calls}\n'
    env = _stand_ins(
        tmp_path / "stand-ins",
        {
            "ldconfig": LDCONFIG_STANDIN,
            "prometheus": "#!/bin/sh\n",
            "python3": "#!/bin/sh\n",  # `import ensurepip` works
            "apt-get": record,
            "sudo": record,
        },
    )
    argv = ["bash", str(SYSDEPS)]
    if _can_shadow_files():
        # The script may name /sbin/ldconfig itself: the stand-in is put there too, in a mount
        # namespace of this command alone.
        ldconfig = tmp_path / "stand-ins" / "ldconfig"
        shadow = (
            'for f in /sbin/ldconfig /usr/sbin/ldconfig; do [ -e "$f" ] && '
            f'mount --bind {ldconfig} "$f"; done; exec bash {SYSDEPS}'
        )
        argv = ["unshare", "--mount", "--map-root-user", "sh", "-c", shadow]
    cp = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert (cp.returncode, cp.stdout + cp.stderr) == (0, ""), cp.stdout + cp.stderr
    assert not calls.exists(), calls.read_text()
