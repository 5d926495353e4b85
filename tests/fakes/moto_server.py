"""moto's server on 127.0.0.1, started once per test session, reached by real boto3 over HTTP.

Use from a test module:

    from tests.fakes.moto_server import aws, moto_server  # noqa: F401  (pytest fixtures)

`moto_server` (session scope) starts `ThreadedMotoServer` on a free port; `aws` (function scope)
points boto3 at it through `AWS_ENDPOINT_URL`, with distinctive fake credentials (so tests can scan
for them: they must never show up in user-data, state or the store), and resets moto's state
after the test. The server runs in this process, so tests and the instance emulator can also reach
moto's backends directly (`ec2_backend`) for what the AWS API itself cannot do, like a spot
interruption.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

TEST_ACCESS_KEY = "AKIASPOTRUNTEST00001"
TEST_SECRET_KEY = "spotrun-test-secret-Never-In-Userdata-0123"
TEST_REGION = "us-east-1"
ACCOUNT_ID = "123456789012"  # moto's default account


@dataclass(frozen=True)
class MotoServer:
    url: str

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        urllib.request.urlopen(request, timeout=10).read()

    def env(self) -> dict[str, str]:
        """The environment a process (the Agent on an emulated instance) needs to reach moto."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_DEFAULT_REGION": TEST_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


_LOADER: list[Any] = []


def fast_session(region: str = TEST_REGION) -> Any:
    """A new boto3 Session that shares botocore's data loader with the others made here.

    A fresh Session re-reads the endpoint and service models (~0.3 s each time); sharing the
    loader keeps every test's own session (own event hooks, own clients) at a few ms.
    """
    import boto3
    import botocore.session

    core = botocore.session.Session()
    if _LOADER:
        core.register_component("data_loader", _LOADER[0])
    else:
        _LOADER.append(core.get_component("data_loader"))
    return boto3.session.Session(botocore_session=core, region_name=region)


def ec2_backend(region: str) -> Any:
    """moto's in-process EC2 backend for `region` (the server thread shares it)."""
    from moto.backends import get_backend

    return get_backend("ec2")[ACCOUNT_ID][region]


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    from moto.server import ThreadedMotoServer
    from moto.utilities.utils import load_resource

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    # moto's 44 generic AMIs (Amazon-owned, Deep Learning AMIs among them) but not its ~1300
    # "latest" AMIs per region, which cost a fraction of a second after every reset
    amis = tmp_path_factory.mktemp("moto") / "amis.json"
    amis.write_text(json.dumps(load_resource("ec2/resources/amis.json"), default=str))
    saved = os.environ.get("MOTO_AMIS_PATH")
    os.environ["MOTO_AMIS_PATH"] = str(amis)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoServer(f"http://{host}:{port}")
    finally:
        server.stop()
        if saved is None:
            os.environ.pop("MOTO_AMIS_PATH", None)
        else:
            os.environ["MOTO_AMIS_PATH"] = saved


_UNSET = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_EC2",
)


def default_vpc_internet(region: str) -> None:
    """Give moto's default VPC what a real one has: an internet gateway and the route 0.0.0.0/0 to
    it in its main route table (moto creates the VPC and its subnets without them)."""
    ec2 = fast_session(region).client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    main = ec2.describe_route_tables(
        Filters=[{"Name": "vpc-id", "Values": [vpc]}, {"Name": "association.main", "Values": ["true"]}]
    )["RouteTables"][0]["RouteTableId"]
    ec2.create_route(RouteTableId=main, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: Any) -> Iterator[MotoServer]:
    """boto3 in this process talks to moto; no real AWS config or credentials are read."""
    for name in _UNSET:
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path_factory.mktemp("awsconfig") / "none"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    moto_server.reset()
    default_vpc_internet(TEST_REGION)
    try:
        yield moto_server
    finally:
        moto_server.reset()
