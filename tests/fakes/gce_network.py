"""The Compute Engine network calls spotrun's egress makes (spotrun/clouds/gcp/network.py), added
to the GCE fake (`install(fake)` from FakeGCE's routes): firewalls get/list/insert and routers
aggregatedList, validated as the real API validates them.

* a firewall needs a valid name (RFC 1035, <= 63), `direction` INGRESS or EGRESS, exactly one of
  `allowed` / `denied`, a priority in 0..65535, and `sourceRanges` (or source tags) on INGRESS;
  an existing name answers 409 alreadyExists, as GCE does;
* an insert answers with a global operation that is already DONE (GCE's firewall inserts finish
  within a poll or two; spotrun waits on the result either way).
* `add_router(region, network, nats)` puts a Cloud Router (with Cloud NAT configs) in place.
"""

from __future__ import annotations

import re
import time
from typing import Any

from tests.fakes.rest_fake import Request, Response

P = r"/compute/v1/projects/(?P<project>[^/]+)"
_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")


def _error(status: int, reason: str, message: str) -> Response:
    errors = [{"domain": "global", "reason": reason, "message": message}]
    return Response(status, {"error": {"code": status, "message": message, "errors": errors}})


def install(fake: Any) -> None:
    fake.firewalls = {}
    fake.routers = {}

    def add_router(region: str, network: str, nats: list[dict[str, Any]]) -> None:
        name = f"router-{len(fake.routers) + 1}"
        fake.routers[(region, name)] = {
            "kind": "compute#router",
            "name": name,
            "region": fake._link("regions", region),
            "network": fake._link("global", "networks", network),
            "nats": nats,
        }

    fake.add_router = add_router

    def fw_get(req: Request) -> Response:
        denied = fake._guard(req)
        if denied:
            return denied
        with fake.lock:
            found = fake.firewalls.get(req.params["name"])
        if found is None:
            return _error(404, "notFound", f"The resource 'projects/{fake.project}/global/firewalls/"
                          f"{req.params['name']}' was not found")  # fmt: skip
        return Response(200, found)

    def fw_list(req: Request) -> Response:
        denied = fake._guard(req)
        if denied:
            return denied
        with fake.lock:
            items = list(fake.firewalls.values())
        return Response(200, {"kind": "compute#firewallList", "items": items})

    def fw_insert(req: Request) -> Response:
        denied = fake._guard(req)
        if denied:
            return denied
        body = req.body if isinstance(req.body, dict) else {}
        name = str(body.get("name", ""))
        if not _NAME.fullmatch(name):
            return _error(400, "invalid", f"Invalid value for field 'resource.name': '{name}'.")
        direction = body.get("direction", "INGRESS")
        if direction not in ("INGRESS", "EGRESS"):
            return _error(400, "invalid", f"Invalid value for field 'resource.direction': '{direction}'.")
        if bool(body.get("allowed")) == bool(body.get("denied")):
            return _error(400, "invalid", "Exactly one of 'allowed' or 'denied' must be specified.")
        priority = int(body.get("priority", 1000))
        if not 0 <= priority <= 65535:
            return _error(400, "invalid", f"Invalid value for field 'resource.priority': '{priority}'.")
        if direction == "INGRESS" and not (body.get("sourceRanges") or body.get("sourceTags")):
            return _error(400, "invalid", "An INGRESS firewall needs sourceRanges or sourceTags.")
        for rule in body.get("allowed") or body.get("denied") or []:
            if "IPProtocol" not in rule:
                return _error(400, "invalid", "Required field 'resource.denied[0].IPProtocol' not specified")
        network = str(body.get("network") or "global/networks/default")
        with fake.lock:
            if name in fake.firewalls:
                return _error(409, "alreadyExists", f"The resource 'projects/{fake.project}/global/firewalls/"
                              f"{name}' already exists")  # fmt: skip
            fake.firewalls[name] = {
                **body,
                "kind": "compute#firewall",
                "id": str(next(fake._ids)),
                "direction": direction,
                "priority": priority,
                "network": network if "://" in network else fake._link(*network.split("/")[-3:]),
                "selfLink": fake._link("global", "firewalls", name),
            }
            op_name = f"operation-{int(time.time() * 1000)}-fw"
            op = {
                "kind": "compute#operation",
                "id": str(next(fake._ids)),
                "name": op_name,
                "operationType": "insert",
                "targetLink": fake._link("global", "firewalls", name),
                "status": "DONE",
                "progress": 100,
                "selfLink": fake._link("global", "operations", op_name),
            }
        return Response(200, op)

    def routers_aggregated(req: Request) -> Response:
        denied = fake._guard(req)
        if denied:
            return denied
        with fake.lock:
            items: dict[str, Any] = {}
            for (region, _name), router in fake.routers.items():
                items.setdefault(f"regions/{region}", {"routers": []})["routers"].append(router)
        return Response(200, {"kind": "compute#routerAggregatedList", "items": items})

    fake.route("GET", P + r"/global/firewalls/(?P<name>[^/]+)", fw_get)
    fake.route("GET", P + r"/global/firewalls", fw_list)
    fake.route("POST", P + r"/global/firewalls", fw_insert)
    fake.route("GET", P + r"/aggregated/routers", routers_aggregated)
