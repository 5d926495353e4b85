"""Relaunch policies, by name. The interface is in :mod:`spotrun.policies.base`."""

from __future__ import annotations

from collections.abc import Callable

from spotrun.policies.base import Policy
from spotrun.policies.baseline import FailoverPolicy, GreedyPolicy, OnDemandPolicy
from spotrun.policies.spotrun_policy import SpotrunPolicy
from spotrun.policies.uniform_progress import UniformProgressPolicy

DEFAULT_POLICY = "spotrun"

POLICIES: dict[str, Callable[[], Policy]] = {
    "on-demand": OnDemandPolicy,
    "greedy": GreedyPolicy,
    "failover": FailoverPolicy,
    "uniform-progress": UniformProgressPolicy,
    "spotrun": SpotrunPolicy,
}


def policy_names() -> list[str]:
    return list(POLICIES)


def policy_sees(name: str) -> str:
    """What the named policy looks at, within the observation model (spotrun.policies.observe)."""
    return str(getattr(POLICIES[name], "sees", "the observation model"))


def make_policy(name: str) -> Policy:
    """A fresh policy (policies learn during a job, so never share one between jobs)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None


__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "make_policy",
    "policy_names",
    "policy_sees",
    "SpotrunPolicy",
    "GreedyPolicy",
    "FailoverPolicy",
    "OnDemandPolicy",
    "UniformProgressPolicy",
]
