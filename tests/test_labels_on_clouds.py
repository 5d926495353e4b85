"""The spec's `labels:` reach the cloud resources: AWS tags (instance and volume), GCE labels,
Azure tags, next to spotrun's own (which they can never replace: 'spotrun*' keys are reserved)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tests.fakes.azure_server import FakeARM, arm_fixture, arm_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.gce_server import FakeGCE, gce_fixture, gce_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.moto_server import aws, moto_server  # noqa: F401  (fixtures)
from tests.test_aws_provider import REGION, clock, described, ec2, session  # noqa: F401  (fixtures)
from tests.test_aws_provider import boot as aws_boot
from tests.test_aws_provider import offer as aws_offer
from tests.test_azure_provider import boot as az_boot
from tests.test_azure_provider import make_provider as az_provider
from tests.test_azure_provider import offer as az_offer
from tests.test_azure_provider import vm_puts
from tests.test_gcp_provider import boot as gce_boot
from tests.test_gcp_provider import inserts
from tests.test_gcp_provider import make_provider as gce_provider
from tests.test_gcp_provider import offer as gce_offer

LABELS = {"team": "nlp", "cost-center": "r-and-d"}


@pytest.fixture
def aws_provider(session: Any, clock: Any) -> Any:  # noqa: F811
    from spotrun.clouds.aws.provider import AWSProvider

    return AWSProvider(region=REGION, session=session, clock=clock, regions=[REGION])


def test_aws_tags_instance_and_volume_with_the_labels(aws_provider: Any) -> None:
    inst = aws_provider.launch(aws_offer("us-east-1b"), spot=True, boot=aws_boot(labels=LABELS), client_token="lbl-1")
    tags = {t["Key"]: t["Value"] for t in described(inst.instance_id)["Tags"]}
    assert tags["team"] == "nlp" and tags["cost-center"] == "r-and-d" and tags["spotrun:job"] == "job-1"
    volumes = ec2().describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [inst.instance_id]}])
    assert {t["Key"]: t["Value"] for t in volumes["Volumes"][0]["Tags"]}["team"] == "nlp"


def test_gce_labels_the_instance(gce: FakeGCE) -> None:
    provider = gce_provider(gce)
    provider.launch(gce_offer(), spot=True, boot=replace(gce_boot(), labels=LABELS), client_token="lbl-2")
    (req,) = inserts(gce)
    labels = req.body["labels"]
    assert labels["team"] == "nlp" and labels["cost-center"] == "r-and-d" and labels["spotrun-attempt"] == "1"


def test_azure_tags_the_vm(arm: FakeARM) -> None:
    provider = az_provider(arm)
    provider.launch(az_offer(), spot=True, boot=replace(az_boot(), labels=LABELS), client_token="lbl-3")
    (req,) = vm_puts(arm)
    assert req.body["tags"]["team"] == "nlp" and req.body["tags"]["spotrun-job"] == "train-0101-abc123"
