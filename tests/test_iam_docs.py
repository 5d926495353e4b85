"""Every API call a provider makes is covered by the permissions its docs/providers page tells the
user to grant (issue #12, item 3). A call the docs miss fails on a real account with an
authorization error that spotrun may swallow (e.g. the AWS leak sweep's `ec2:DescribeRegions`).

* AWS: every boto3 operation named in spotrun/clouds/aws/*.py (the attribute names and paginator
  names that are operations of the services spotrun creates clients for) must be allowed by the
  JSON policies in docs/providers/aws.md.
* GCP / Azure: the provider runs check, launch, poll, console, list and terminate against the
  fakes, whose request logs are every call it made; each maps to the permission the real API
  checks, which must appear in the page's Permissions section.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import json
import re
from pathlib import Path

from spotrun.catalog.model import Offer
from spotrun.clock import FakeClock
from spotrun.clouds.azure.provider import AzureProvider
from spotrun.clouds.base import Boot
from spotrun.clouds.gcp.provider import GCPProvider
from tests.fakes.azure_server import (  # noqa: F401  (fixtures)
    RESOURCE_GROUP,
    SUBSCRIPTION,
    FakeARM,
    StaticToken,
    arm_fixture,
    arm_server_fixture,
)
from tests.fakes.gce_server import PROJECT, FakeGCE, gce_credentials, gce_fixture, gce_server_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "providers"
AWS_SERVICES = {  # boto3 service name -> IAM action prefix
    "ec2": "ec2",
    "iam": "iam",
    "ssm": "ssm",
    "sts": "sts",
    "service-quotas": "servicequotas",
    "secretsmanager": "secretsmanager",
    "s3": "s3",
}
S3_ACTIONS = {"HeadObject": "GetObject", "DeleteObjects": "DeleteObject", "ListObjectsV2": "ListBucket"}


def section(text: str, heading: str) -> str:
    """The text of the `## heading` section of a markdown page."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no section {heading!r}"
    return m.group(1)


# ---------------------------------------------------------------------- AWS


def aws_calls() -> dict[str, set[str]]:
    """file -> IAM actions of the boto3 operations it names."""
    import botocore.session
    from botocore import xform_name

    session = botocore.session.get_session()
    ops: dict[str, list[str]] = {}
    for service, prefix in AWS_SERVICES.items():
        for op in session.get_service_model(service).operation_names:
            ops.setdefault(xform_name(op), []).append(f"{prefix}:{op}")
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / "spotrun" / "clouds" / "aws").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {  # get_paginator("describe_instances")
            c.args[0].value
            for c in ast.walk(tree)
            if isinstance(c, ast.Call)
            and isinstance(c.func, ast.Attribute)
            and c.func.attr == "get_paginator"
            and c.args
            and isinstance(c.args[0], ast.Constant)
        }
        actions: set[str] = set()
        for name in names & set(ops):
            candidates = ops[name]
            if len(candidates) > 1:  # the same method name on two services: the one this file's clients are
                used = {AWS_SERVICES[s] for s in re.findall(r'client\("([a-z-]+)"', path.read_text())}
                candidates = [c for c in candidates if c.split(":")[0] in used] or candidates
            actions.update(candidates)
        if actions:
            out[path.name] = actions
    return out


def aws_documented() -> list[str]:
    """Every Allow action in the JSON policies of docs/providers/aws.md."""
    text = (DOCS / "aws.md").read_text()
    allowed: list[str] = []
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        policy = json.loads(re.sub(r"\.\.\.", "", block))
        for st in policy.get("Statement", []):
            if st.get("Effect") == "Allow":
                action = st.get("Action", [])
                allowed += [action] if isinstance(action, str) else action
    return allowed


def test_aws_policy_in_docs_covers_every_call() -> None:
    calls = aws_calls()
    assert "ec2:DescribeRegions" in calls["provider.py"]  # the leak sweep's region listing
    allowed = aws_documented()
    missing = {}
    for name, actions in calls.items():
        for action in sorted(actions):
            service, op = action.split(":")
            if service == "s3":
                action = f"s3:{S3_ACTIONS.get(op, op)}"
            if not any(fnmatch.fnmatchcase(action, pattern) for pattern in allowed):
                missing.setdefault(name, []).append(action)
    assert missing == {}, f"docs/providers/aws.md lacks: {missing}"


# ---------------------------------------------------------------------- GCP


def documented_permissions(page: str) -> set[str]:
    """`compute.instances.create`, `.get` ... in the Permissions section, the short forms expanded."""
    text = section((DOCS / page).read_text(), "Permissions")
    found: set[str] = set()
    base = ""
    for token in re.findall(r"`([A-Za-z./_*-]+)`", text):
        if token.startswith(".") and base:
            found.add(base + token)
        elif "." in token and "/" not in token:
            found.add(token)
            base = token.rsplit(".", 1)[0]
    return found


GCE_PERMISSIONS = [  # (method, path regex) -> what Compute Engine checks (the first match)
    # a multi-node gang's compact placement policy (clouds/gcp/provider.py gang_placement)
    ("POST", r"/resourcePolicies$", ["compute.resourcePolicies.create"]),
    ("DELETE", r"/resourcePolicies/[^/]+$", ["compute.resourcePolicies.delete"]),
    ("POST", r"/regions/[^/]+/operations/[^/]+/wait$", ["compute.regionOperations.get"]),
    ("GET", r"/regions/[^/]+/operations/[^/]+$", ["compute.regionOperations.get"]),
    ("POST", r"/instances$", ["compute.instances.create", "compute.disks.create", "compute.subnetworks.use",
                              "compute.instances.setMetadata", "compute.instances.setLabels",
                              "compute.instances.setServiceAccount", "iam.serviceAccounts.actAs",
                              "compute.images.useReadOnly", "compute.instances.setTags",
                              "compute.subnetworks.useExternalIp"]),
    ("GET", r"/global/firewalls(/[^/]+)?$", ["compute.firewalls.list", "compute.firewalls.get"]),
    ("POST", r"/global/firewalls$", ["compute.firewalls.create", "compute.networks.updatePolicy"]),
    ("GET", r"/aggregated/routers$", ["compute.routers.list"]),
    ("GET", r"/instances/[^/]+$", ["compute.instances.get"]),
    ("DELETE", r"/instances/[^/]+$", ["compute.instances.delete"]),
    ("GET", r"/instances/[^/]+/serialPort$", ["compute.instances.getSerialPortOutput"]),
    ("GET", r"/aggregated/instances$", ["compute.instances.list"]),
    ("GET", r"/operations/[^/]+$", ["compute.zoneOperations.get"]),
    ("POST", r"/operations/[^/]+/wait$", ["compute.zoneOperations.get"]),
    ("GET", r"/operations$", ["compute.zoneOperations.list"]),
    ("GET", r"/acceleratorTypes/[^/]+$", ["compute.acceleratorTypes.get"]),
    ("GET", r"/projects/[^/]+$", ["compute.projects.get"]),
    ("GET", r"/v1/projects/[^/]+/serviceAccounts/[^/]+$", ["iam.serviceAccounts.get"]),
    # the job's own service account (clouds/gcp/identity.py): created, bound on the bucket, deleted
    ("POST", r"/v1/projects/[^/]+/serviceAccounts$", ["iam.serviceAccounts.create"]),
    ("GET", r"/v1/projects/[^/]+/serviceAccounts$", ["iam.serviceAccounts.list"]),
    ("DELETE", r"/v1/projects/[^/]+/serviceAccounts/[^/]+$", ["iam.serviceAccounts.delete"]),
    ("GET", r"/storage/v1/b/[^/]+/iam$", ["storage.buckets.getIamPolicy"]),
    ("PUT", r"/storage/v1/b/[^/]+/iam$", ["storage.buckets.setIamPolicy"]),
]  # fmt: skip


def gcp_calls(gce: FakeGCE) -> set[str]:
    provider = GCPProvider(
        PROJECT,
        endpoint=gce.url,
        credentials=gce_credentials(),
        imds_endpoint=gce.metadata_endpoint,
        service_account="spotrun-runner@spotrun-test.iam.gserviceaccount.com",
        clock=FakeClock(),
    )
    boot = Boot(job_id="iam-job", attempt=1, store_url="gs://b/p", job_prefix="jobs/iam-job")
    offer = Offer("gcp", "us-central1", "us-central1-a", "n1-standard-8", "T4", 1, 16.0, 8, 30, 0.2, 0.6, 0.1)
    provider.check()
    inst = provider.launch(offer, spot=True, boot=boot, client_token="iam")
    provider.poll(inst)
    provider.console_output(inst)
    provider.list_owned("iam-job")
    provider.terminate(inst)
    provider.poll(inst)  # gone: was it preempted? (zone operations list)
    gang_boot = Boot(job_id="iam-job", attempt=2, store_url="gs://b/p", job_prefix="jobs/iam-job")
    placed = provider.gang_placement(offer, "iam-job", 1)  # a multi-node job's placement policy
    node = provider.launch(offer, spot=True, boot=gang_boot, client_token="iam-gang", placement=placed)
    provider.terminate(node)
    from spotrun.clouds.gcp.identity import leftover_accounts

    leftover_accounts(provider)  # what `spotrun gc` sweeps
    provider.release_job("iam-job")  # the job's service account and its bucket bindings
    needed: set[str] = set()
    for req in gce.requests:
        path = req.path.split("?", 1)[0]
        rules = [perms for method, rx, perms in GCE_PERMISSIONS if method == req.method and re.search(rx, path)]
        assert rules, f"a call the test does not know: {req.method} {path}"
        needed.update(rules[0])
    return needed


def test_gcp_permissions_in_docs_cover_every_call(gce: FakeGCE) -> None:
    needed = gcp_calls(gce)
    assert "compute.instances.getSerialPortOutput" in needed
    missing = needed - documented_permissions("gcp.md")
    assert missing == set(), f"docs/providers/gcp.md lacks: {sorted(missing)}"


# ---------------------------------------------------------------------- Azure


def arm_action(method: str, path: str) -> list[str]:
    """What ARM authorizes for one request."""
    if re.search(r"/providers/Microsoft\.Compute/skus$", path):
        return ["Microsoft.Compute/skus/read"]
    if "/operations/" in path:
        return []  # polling an operation is authorized by the original request
    m = re.search(r"/providers/(Microsoft\.\w+)/(\w+)(/[^/]+)?$", path)
    assert m, path
    resource = f"{m.group(1)}/{m.group(2)}"
    verb = {"GET": "read", "PUT": "write", "DELETE": "delete"}[method]
    actions = [f"{resource}/{verb}"]
    if resource == "Microsoft.Network/networkInterfaces" and method == "PUT":
        actions += ["Microsoft.Network/virtualNetworks/subnets/join/action",
                    "Microsoft.Network/networkSecurityGroups/join/action",
                    "Microsoft.Network/publicIPAddresses/join/action"]  # fmt: skip
    if resource == "Microsoft.Compute/virtualMachines" and method == "PUT":
        actions += ["Microsoft.Network/networkInterfaces/join/action",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action"]  # fmt: skip
    if resource == "Microsoft.Compute/virtualMachines" and method == "DELETE":
        actions += ["Microsoft.Compute/disks/delete"]  # deleteOption Delete removes the OS disk
    return actions


def azure_documented() -> tuple[set[str], set[str]]:
    """(actions granted on the resource group, actions granted on the subscription)."""
    text = section((DOCS / "azure.md").read_text(), "Permissions")
    rg = re.search(r"\*\*On the resource group\*\*(.*?)(?=\*\*On the subscription\*\*)", text, re.S)
    sub = re.search(r"\*\*On the subscription\*\*(.*?)(?=\n\n\*\*|\Z)", text, re.S)
    assert rg and sub, "docs/providers/azure.md: the Permissions section names each scope once"

    def expand(part: str) -> set[str]:
        found: set[str] = set()
        base = ""
        for token in re.findall(r"`([A-Za-z./_*-]+)`", part):
            if token.startswith("Microsoft."):
                found.add(token)
                base = token.rsplit("/", 1)[0] if not token.endswith("/action") else token.rsplit("/", 2)[0]
            elif token.startswith("/") and base:
                found.add(base + token)
        return found

    return expand(rg.group(1)), expand(sub.group(1))


def test_azure_permissions_in_docs_cover_every_call_at_the_right_scope(arm: FakeARM) -> None:
    identity = (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/spotrun-runner"
    )
    provider = AzureProvider(
        SUBSCRIPTION,
        RESOURCE_GROUP,
        endpoint=arm.url,
        credential=StaticToken(),
        poll_interval=0.01,
        identity=identity,
        imds_endpoint=arm.metadata_endpoint,
    )
    boot = Boot(job_id="iam-job", attempt=1, store_url="az://c@a/p", job_prefix="jobs/iam-job")
    offer = Offer("azure", "eastus", "", "Standard_NC4as_T4_v3", "T4", 1, 16.0, 4, 28, 0.2, 0.5, 0.05)
    provider.check()
    inst = provider.launch(offer, spot=True, boot=boot, client_token="iam")
    provider.poll(inst)
    provider.list_owned("iam-job")
    provider.terminate(inst)
    placed = provider.gang_placement(offer, "iam-job", 1)  # a multi-node job's proximity placement group
    second = dataclasses.replace(boot, attempt=2)
    node = provider.launch(offer, spot=True, boot=second, client_token="g", placement=placed)
    provider.terminate(node)
    from spotrun.clouds.azure.identity import leftover_identities

    leftover_identities(provider)  # what `spotrun gc` sweeps
    provider.release_job("iam-job")  # the job's identity and its role assignments
    needed: dict[str, str] = {}
    for req in arm.requests:
        for action in arm_action(req.method, req.path):
            needed[action] = "subscription" if action == "Microsoft.Compute/skus/read" else "resource group"
    on_rg, on_sub = azure_documented()
    missing = [a for a, scope in needed.items() if a not in (on_sub if scope == "subscription" else on_rg)]
    assert missing == [], f"docs/providers/azure.md lacks: {missing}"
    # SKUs are listed per subscription: a role on the resource group does not cover it (#12)
    assert "Microsoft.Compute/skus/read" in on_sub and "Microsoft.Compute/skus/read" not in on_rg


def test_aws_controller_host_role_allows_what_the_documented_user_policy_allows() -> None:
    """The controller host does on its own what `spotrun` does for the user: its role
    (`controller_policy`) grants, statement by statement, the actions of the user policy in
    docs/providers/aws.md, and so every call the AWS provider makes."""
    from spotrun.clouds.aws.resources import controller_policy

    text = (DOCS / "aws.md").read_text()
    user = json.loads(re.findall(r"```json\n(.*?)```", section(text, "IAM permissions"), re.S)[0])
    host = controller_policy("s3://bucket/prefix")

    def actions(policy: dict) -> dict[str, set[str]]:  # type: ignore[type-arg]
        out = {}
        for st in policy["Statement"]:
            action = st["Action"]
            out[st["Sid"]] = {action} if isinstance(action, str) else set(action)
        return out

    assert actions(host) == actions(user)
    allowed = [a for acts in actions(host).values() for a in acts]
    for name, calls in aws_calls().items():
        for action in calls:
            service, op = action.split(":")
            if service == "s3":
                action = f"s3:{S3_ACTIONS.get(op, op)}"
            if action == "secretsmanager:GetSecretValue":
                continue  # the job's own role reads its secret (secrets.py); no controller does
            assert any(fnmatch.fnmatchcase(action, p) for p in allowed), (name, action)
