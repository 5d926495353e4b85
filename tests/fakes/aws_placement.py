"""EC2 placement groups on moto, which has none: CreatePlacementGroup, DescribePlacementGroups and
DeletePlacementGroup as EC2 answers them, and RunInstances refusing a `Placement.GroupName` that
does not exist in the region (InvalidPlacementGroup.Unknown) or a cluster group in another
instance's zone... kept simple: the name must exist. moto's server runs in this process, so the
patch reaches every client (`serve_placement_groups()`, idempotent).

What EC2 refuses and this fake refuses too: a duplicate name (InvalidPlacementGroup.Duplicate),
a strategy other than cluster, spread or partition (InvalidParameterValue), an unknown group
in RunInstances, Describe or Delete (InvalidPlacementGroup.Unknown).
"""

from __future__ import annotations

import itertools
from typing import Any

GROUPS: dict[tuple[str, str], dict[str, Any]] = {}  # (region, name) -> group
_ids = itertools.count(1)


def serve_placement_groups() -> None:
    from moto.core.responses import ActionResult, EmptyResult
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.responses import EC2Response
    from moto.ec2.responses.instances import InstanceResponse

    if getattr(EC2Response, "_spotrun_placement", False):
        return

    def unknown(name: str) -> EC2ClientError:
        return EC2ClientError("InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")

    def create_placement_group(self: Any) -> Any:
        name = self._get_param("GroupName")
        strategy = self._get_param("Strategy")
        if strategy not in ("cluster", "spread", "partition"):
            raise EC2ClientError("InvalidParameterValue", f"Value ({strategy}) for parameter strategy is invalid.")
        if (self.region, name) in GROUPS:
            raise EC2ClientError("InvalidPlacementGroup.Duplicate", f"The Placement Group '{name}' already exists.")
        group = {"GroupName": name, "State": "available", "Strategy": strategy, "GroupId": f"pg-{next(_ids):017x}"}
        GROUPS[(self.region, name)] = group
        return ActionResult({"PlacementGroup": group})

    def describe_placement_groups(self: Any) -> Any:
        names = self._get_param("GroupNames", [])
        for name in names:
            if (self.region, name) not in GROUPS:
                raise unknown(name)
        found = [g for (region, n), g in GROUPS.items() if region == self.region and (not names or n in names)]
        return ActionResult({"PlacementGroups": found})

    def delete_placement_group(self: Any) -> Any:
        name = self._get_param("GroupName")
        if GROUPS.pop((self.region, name), None) is None:
            raise unknown(name)
        return EmptyResult()

    run = InstanceResponse.run_instances

    def run_instances(self: Any) -> Any:
        name = self._get_param("Placement.GroupName")
        if name and (self.region, name) not in GROUPS:
            raise unknown(name)
        return run(self)

    EC2Response.create_placement_group = create_placement_group
    EC2Response.describe_placement_groups = describe_placement_groups
    EC2Response.delete_placement_group = delete_placement_group
    InstanceResponse.run_instances = run_instances
    EC2Response._spotrun_placement = True
