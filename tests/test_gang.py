"""Multi-node gangs without torch: the spec key, the planner's pricing, the all-or-nothing launch on
the local provider (real hypervisors, the stand-in Agent), the store protocol the Agents share
(rendezvous address, notice broadcast, a sharded checkpoint committed only when every node's part
is in) and how the controller reads a gang's end."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spotrun.agent.gang import Gang, GangUploader
from spotrun.agent.sync import restore_latest
from spotrun.catalog.model import Offer
from spotrun.checkpoint.format import MANIFEST_NAME, sha256_file, step_dirname, write_manifest
from spotrun.clouds.base import Boot, InstanceState, InstanceStatus, NoCapacity
from spotrun.clouds.local.host import marked_processes
from spotrun.clouds.local.provider import LocalProvider
from spotrun.clouds.store import LocalStore
from spotrun.control.gang import GangProvider, gang_exit, gang_id
from spotrun.control.records import ExitRecord
from spotrun.planner import plan
from spotrun.spec import SpecError, load_spec

FAKE_AGENT = str(Path(__file__).parent / "fixtures_local" / "fake_agent.py")
MARKET = """
time_scale: 60
notice: 0.5
boot: 0.1
zones:
  - {zone: two, region: r1, instance_type: t, vcpus: 1, memory_gb: 1, spot_price: 0.1, ondemand_price: 0.3,
     capacity: 2}
  - {zone: slow, region: r1, instance_type: t, vcpus: 1, memory_gb: 1, spot_price: 0.1, ondemand_price: 0.3}
"""


def spec_file(tmp_path: Path, nodes: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: g\nrun: echo hi\nresources:\n  nodes: {nodes}\n  cpus: 1\nworkload: {{hours: 2}}\n")
    return path


def test_nodes_defaults_to_one_and_is_checked_with_its_line(tmp_path: Path) -> None:
    assert load_spec(spec_file(tmp_path, "3")).resources.nodes == 3
    (tmp_path / "one.yaml").write_text("name: g\nrun: echo hi\n")
    assert load_spec(tmp_path / "one.yaml").resources.nodes == 1
    with pytest.raises(SpecError) as err:
        load_spec(spec_file(tmp_path, "0"))
    assert "job.yaml:4:" in str(err.value) and "resources.nodes" in str(err.value)


def test_planner_prices_the_gang_and_counts_any_node_preemption(tmp_path: Path) -> None:
    offer = Offer(
        provider="aws", region="r1", zone="r1a", instance_type="c", vcpus=8, memory_gb=32, gpu=None, gpu_count=0,
        gpu_memory_gb=0, spot_price=1.0, ondemand_price=3.0, interruption_rate=0.05,
    )  # fmt: skip
    one = plan(load_spec(spec_file(tmp_path, "1")), [offer])
    three = plan(load_spec(spec_file(tmp_path, "3")), [offer])
    c1 = next(c for c in one.candidates if c.spot)
    c3 = next(c for c in three.candidates if c.spot)
    assert c3.hourly_price == pytest.approx(3 * c1.hourly_price) and c3.nodes == 3
    assert c3.expected_preemptions / c3.expected_hours == pytest.approx(3 * 0.05)  # N x the node's rate
    assert c3.expected_hours < c1.expected_hours  # the work is spread over three nodes
    assert any("3 nodes as one gang" in note for note in three.notes)


@pytest.fixture
def local(tmp_path: Path):  # noqa: ANN201
    market = tmp_path / "market.yaml"
    market.write_text(textwrap.dedent(MARKET))
    provider = LocalProvider(market, root=tmp_path / "local", agent_command=[sys.executable, FAKE_AGENT])
    yield provider
    for inst in provider.list_owned("job1"):
        provider.terminate(inst)


def boot(attempt: int = 1) -> Boot:
    return Boot(job_id="job1", attempt=attempt, store_url="file:///nowhere", job_prefix="jobs/job1")


def test_gang_launch_is_all_or_nothing_when_a_node_is_refused(local: LocalProvider) -> None:
    offer = next(o for o in local.market_offers() if o.zone == "two")
    gang = GangProvider(local, 3, start_timeout=20)
    began = time.monotonic()
    with pytest.raises(NoCapacity):
        gang.launch(offer, spot=True, boot=boot(), client_token="tok")  # capacity 2: node 2 is refused
    assert time.monotonic() - began < 20
    assert local.list_owned("job1") == []  # nodes 0 and 1 were terminated, not left running
    for sandbox in (local.root / "instances").iterdir():
        assert marked_processes(sandbox.name) == []


def test_gang_not_running_within_the_bound_is_torn_down(local: LocalProvider, tmp_path: Path) -> None:
    market = tmp_path / "slow.yaml"
    market.write_text(textwrap.dedent(MARKET).replace("boot: 0.1", "boot: 600"))  # 10 s of real boot
    slow = LocalProvider(market, root=tmp_path / "local", agent_command=[sys.executable, FAKE_AGENT])
    offer = next(o for o in slow.market_offers() if o.zone == "slow")
    began = time.monotonic()
    with pytest.raises(NoCapacity, match="not running within 1s"):
        GangProvider(slow, 2, start_timeout=1.0).launch(offer, spot=True, boot=boot(), client_token="t2")
    assert time.monotonic() - began < 1.0 + 2 * 5.0 + 2  # the bound, plus the terminate calls
    assert slow.list_owned("job1") == []


def test_gang_runs_as_one_instance_and_a_node_preemption_is_the_gangs(local: LocalProvider) -> None:
    offer = next(o for o in local.market_offers() if o.zone == "slow")
    gang = GangProvider(local, 2, start_timeout=20)
    inst = gang.launch(offer, spot=True, boot=boot(), client_token="t3")
    assert inst.instance_id == gang_id("job1", 1) and len(inst.details["gang"]) == 2
    envs = [
        json.loads(Path(m["details"]["sandbox"], "instance.json").read_text())["boot"]["env"]
        for m in inst.details["gang"]
    ]
    assert [e["SPOTRUN_NODE_RANK"] for e in envs] == ["0", "1"] and {e["SPOTRUN_NUM_NODES"] for e in envs} == {"2"}
    assert gang.poll(inst).status == InstanceStatus.RUNNING
    assert [i.instance_id for i in gang.list_owned("job1")] == [inst.instance_id]  # the sweep spares it
    local.preempt(gang.members(inst)[1], notice=0)
    end = time.monotonic() + 10
    while gang.poll(inst).status != InstanceStatus.PREEMPTED:
        assert time.monotonic() < end
        time.sleep(0.05)
    assert gang.poll(inst).reason.startswith("gang: node 1")
    gang.terminate(inst)
    assert local.list_owned("job1") == []


def test_node_zeros_failure_after_a_lost_peer_is_an_interruption() -> None:
    lost = InstanceState(InstanceStatus.PREEMPTED, reason="gang: node 1 preempted: without notice")
    failed = ExitRecord(1, "failed", error="gloo: connection closed by peer")
    assert gang_exit(failed, lost).preempted  # type: ignore[union-attr]
    assert not gang_exit(failed, InstanceState(InstanceStatus.EXITED, 1)).preempted  # type: ignore[union-attr]
    done = ExitRecord(0, "completed")
    assert gang_exit(done, lost) is done


# --------------------------------------------------------------------------- the Agents' store protocol


def env(rank: int, nodes: int = 2) -> dict[str, str]:
    return {"SPOTRUN_NODE_RANK": str(rank), "SPOTRUN_NUM_NODES": str(nodes), "SPOTRUN_GANG_HOST": "127.0.0.1"}


def test_rendezvous_address_and_notice_go_through_the_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    n0, n1 = (Gang(store, "jobs/j", "j", 4, env(r)) for r in (0, 1))
    assert Gang.from_env(store, "jobs/j", "j", 4, {"SPOTRUN_NUM_NODES": "1"}) is None
    endpoint = n0.endpoint(lambda: None)
    assert endpoint.startswith("127.0.0.1:") and n1.endpoint(lambda: None) == endpoint
    cmd = Gang.command("torchrun train.py --steps 3")
    assert cmd == "$SPOTRUN_TORCHRUN train.py --steps 3" and Gang.command("python x.py") == "python x.py"
    line = n1.env(endpoint)["SPOTRUN_TORCHRUN"]
    assert "--nnodes 2" in line and "--node-rank 1" in line and "--rdzv-backend c10d" in line
    assert f"--rdzv-endpoint {endpoint}" in line and "is_host=0" in line
    assert line.split()[1:3] == ["-m", "torch.distributed.run"]  # on the VM: its own interpreter
    inside = n1.env(endpoint, in_container=True)  # in the job's image: the image's own torchrun
    assert inside["SPOTRUN_TORCHRUN"].split()[0] == "torchrun" and "--node-rank 1" in inside["SPOTRUN_TORCHRUN"]
    assert inside["MASTER_ADDR"] == endpoint.rpartition(":")[0]
    # a gang's container shares the VM's network (the rendezvous port and the collective's own)
    assert Gang.container_args([]) == ["--network", "host"]
    assert Gang.container_args(["--network=mynet"]) == [] and Gang.container_args(["--net", "x"]) == []
    assert n0.read_notice(interval=0) is None
    n1.post_notice(30.0, "preempted")
    left, reason = n0.read_notice(interval=0)  # type: ignore[misc]
    assert reason == "preempted" and 1.0 <= left <= 30.0
    assert n1.read_notice(interval=0) is None  # its own notice: it already knows
    assert n0.own_prefix == "jobs/j" and n1.own_prefix == "jobs/j/nodes/1"


def node_checkpoint(root: Path, step: int, files: dict[str, bytes]) -> None:
    folder = root / step_dirname(step)
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    write_manifest(folder, step, {n: ((folder / n).stat().st_size, sha256_file(folder / n)) for n in files})


def test_sharded_checkpoint_is_committed_only_when_every_part_is_in(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    notes: list[str] = []
    uploaders = []
    for r in (0, 1):
        root = tmp_path / f"node{r}"
        files = {f"__{r}_0.distcp": bytes([r]) * 100, f"rank-{r:05d}.pt": b"rng" * (r + 1)}
        if r == 0:
            files[".metadata"] = b"meta"
        node_checkpoint(root, 10, files)
        gang = Gang(store, "jobs/j", "j", 1, env(r))
        uploaders.append(GangUploader(gang, store, "jobs/j", root, note=notes.append))
    manifest_key = f"jobs/j/checkpoints/{step_dirname(10)}/{MANIFEST_NAME}"
    import spotrun.agent.gang as gang_module

    gang_module.PARTS_WAIT, saved = 0.5, gang_module.PARTS_WAIT
    try:
        assert uploaders[0].sync_once(final=True) == 10  # its own part; node 1's is missing
    finally:
        gang_module.PARTS_WAIT = saved
    assert not store.exists(manifest_key) and any("not every node's part arrived" in n for n in notes)
    assert restore_latest(store, "jobs/j", tmp_path / "fresh", notes.append) is None  # a partial one: never loaded

    assert uploaders[1].sync_once() == 10  # node 1's part
    assert not store.exists(manifest_key)  # node 1 never commits
    assert uploaders[0].commit_ready() == 10  # node 0's next sync commits the union
    merged = json.loads(store.get_bytes(manifest_key))
    assert sorted(merged["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "rank-00000.pt", "rank-00001.pt"]
    assert restore_latest(store, "jobs/j", tmp_path / "fresh", notes.append) == 10
    assert (tmp_path / "fresh" / step_dirname(10) / "__1_0.distcp").read_bytes() == bytes([1]) * 100
