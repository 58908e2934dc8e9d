"""Which ServiceAccount the trainer pods get: the operator's default only where it exists."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from test_plan import make_task

from slm_operator.kube import KubeError
from slm_operator.reconcile import trainer_account


class Accounts:
    """Just enough of :class:`slm_operator.kube.Kube` to answer ServiceAccount reads."""

    def __init__(self, existing: set[tuple[str, str]], status: int | None = None) -> None:
        self.existing, self.status, self.gets = existing, status, 0

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> Any | None:
        assert (api_version, plural) == ("v1", "serviceaccounts")
        self.gets += 1
        if self.status is not None:
            raise KubeError(self.status, "nope")
        return {"metadata": {"name": name}} if (namespace, name) in self.existing else None


def test_default_account_is_used_where_it_exists() -> None:
    kube = Accounts({("agents", "slm-trainer")})
    assert trainer_account(kube, make_task(), "slm-trainer") == "slm-trainer"


def test_missing_account_falls_back_to_the_namespace_default_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube = Accounts(set())
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert trainer_account(kube, make_task(), "gone") == ""
    assert sum("gone" in r.getMessage() for r in caplog.records) == 1


def test_no_lookup_without_a_default_or_with_the_tasks_own_account() -> None:
    kube = Accounts(set())
    assert trainer_account(kube, make_task(), "") == ""
    own = make_task(training={"serviceAccountName": "s3-reader"})
    assert trainer_account(kube, own, "slm-trainer") == ""
    assert kube.gets == 0


def test_forbidden_lookup_trusts_the_configuration_and_other_errors_retry() -> None:
    assert trainer_account(Accounts(set(), 403), make_task(), "sa") == "sa"
    with pytest.raises(KubeError):
        trainer_account(Accounts(set(), 503), make_task(), "sa")
