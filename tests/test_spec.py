"""The job spec: good specs load into the documented models; every bad spec is refused with the
exact message a user will read (file:line:column: key.path: what is wrong and what is allowed), all
problems at once, and never with a traceback."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spotrun.gpus import GPU_NAMES
from spotrun.spec import JobSpec, SpecError, SpecIssue, closest_match, load_spec, parse_spec_text

HEAD = "name: demo\nrun: python train.py\n"  # a valid minimum; cases below add lines 3+
TOP_KEYS = (
    "aws, azure, budget, checkpoint, controller, data, deadline, env, gcp, image, labels, local, name, recovery, "
    "resources, run, setup, store, workdir, workload"
)
RESOURCE_KEYS = "cpus, disk, gpu, max_price, memory, nodes, providers, regions, spot, zones"
GPUS = ", ".join(sorted(GPU_NAMES))


def errors(text: str, base: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec_text(text, "job.yaml", base_dir=base, environ=environ or {})
    return str(caught.value).splitlines()


# (id, spec text, the exact lines of str(SpecError)); "{tmp}" stands for the spec's folder.
BAD_SPECS: list[tuple[str, str, list[str]]] = [
    ("typo-top-level-key", HEAD + "resorces:\n  gpu: A100\n",
     [f"job.yaml:3:1: resorces: unknown key 'resorces'; allowed: {TOP_KEYS} (did you mean 'resources'?)"]),
    ("key-in-the-wrong-section", HEAD + "gpu: A100\n",
     [f"job.yaml:3:1: gpu: unknown key 'gpu'; allowed: {TOP_KEYS} (did you mean 'resources.gpu'?)"]),
    ("typo-nested-key", HEAD + "resources:\n  gpus: A100:2\n",
     [f"job.yaml:4:3: resources.gpus: unknown key 'gpus'; allowed: {RESOURCE_KEYS} (did you mean 'gpu'?)"]),
    ("typo-checkpoint-key", HEAD + "checkpoint:\n  intervall: 10m\n",
     ["job.yaml:4:3: checkpoint.intervall: unknown key 'intervall'; allowed: dir, interval, keep "
      "(did you mean 'interval'?)"]),
    ("name-and-run-missing", "resources:\n  gpu: A100\n",
     ["job.yaml:1:1: name: required key is missing (a short job name like 'my-job')",
      "job.yaml:1:1: run: required key is missing (the command that starts training, like 'python train.py')"]),
    ("name-uppercase", "name: My_Job\nrun: x\n",
     ["job.yaml:1:7: name: invalid name 'My_Job'; use 1-63 lowercase letters, digits and '-', starting with "
      "a letter and ending with a letter or digit (e.g. 'my-job')"]),
    ("name-too-long", "name: " + "a" * 64 + "\nrun: x\n",
     ["job.yaml:1:7: name: is 64 characters long; at most 63 allowed"]),
    ("name-a-number", "name: 3.10\nrun: x\n",
     ["job.yaml:1:7: name: expected text, got 3.1; put it in quotes to keep it as text"]),
    ("run-empty", "name: demo\nrun: '  '\n",
     ["job.yaml:2:6: run: must not be empty; give the command that starts training, e.g. 'python train.py'"]),
    ("unknown-gpu", HEAD + "resources:\n  gpu: A1OO:2\n",
     [f"job.yaml:4:8: resources.gpu: unknown GPU 'A1OO'; allowed: {GPUS} (did you mean 'A100'?)"]),
    ("gpu-count-too-high", HEAD + "resources:\n  gpu: H100:17\n",
     ["job.yaml:4:8: resources.gpu: GPU count must be from 1 to 16, got 17 in 'H100:17'"]),
    ("gpu-count-not-a-number", HEAD + "resources:\n  gpu: A100:x\n",
     ["job.yaml:4:8: resources.gpu: invalid GPU count 'x' in 'A100:x'; write NAME:COUNT like 'A100:8'"]),
    ("gpu-memory-no-such-part", HEAD + "resources:\n  gpu: {name: A100, memory: 100GB}\n",
     ["job.yaml:4:29: resources.gpu.memory: no A100 has 100 GB; it comes with 40 or 80 GB per GPU"]),
    ("gpu-memory-contradicts-name", HEAD + "resources:\n  gpu:\n    name: A100-80GB\n    memory: 40\n",
     ["job.yaml:6:13: resources.gpu.memory: 40 contradicts name 'A100-80GB', which says 80 GB; "
      "give the memory once"]),
    ("gpu-mapping-bad-name", HEAD + "resources:\n  gpu: {name: A10O, count: 0}\n",
     [f"job.yaml:4:15: resources.gpu.name: unknown GPU 'A10O'; allowed: {GPUS} (did you mean 'A100'?)",
      "job.yaml:4:28: resources.gpu.count: must be from 1 to 16, got 0"]),
    ("gpu-a-number", HEAD + "resources:\n  gpu: 2\n",
     ["job.yaml:4:8: resources.gpu: expected a GPU like 'A100:1' or a mapping with name, count and memory, "
      "got 2"]),
    ("cpus-zero", HEAD + "resources:\n  cpus: 0\n", ["job.yaml:4:9: resources.cpus: must be 1 or more, got 0"]),
    ("cpus-fraction", HEAD + "resources:\n  cpus: 2.5\n",
     ["job.yaml:4:9: resources.cpus: expected a whole number, got 2.5"]),
    ("memory-not-a-size", HEAD + "resources:\n  memory: lots\n",
     ["job.yaml:4:11: resources.memory: invalid size 'lots'; use a number with a unit like 40GB, 512MB or "
      "1.5TiB (a plain number means GB)"]),
    ("disk-bad-unit", HEAD + "resources:\n  disk: 40GiG\n",
     ["job.yaml:4:9: resources.disk: unknown size unit 'GiG' in '40GiG'; use B, KB, MB, GB, TB (1000-based) "
      "or KiB, MiB, GiB, TiB (1024-based); a plain number means GB"]),
    ("unknown-provider", HEAD + "resources:\n  providers: [aws, gcq]\n",
     ["job.yaml:4:20: resources.providers[1]: unknown provider 'gcq'; allowed: local, aws, gcp, azure "
      "(did you mean 'gcp'?)"]),
    ("providers-empty", HEAD + "resources:\n  providers: []\n",
     ["job.yaml:4:14: resources.providers: must not be empty; leave the key out to allow all providers"]),
    ("spot-maybe", HEAD + "resources:\n  spot: maybe\n",
     ["job.yaml:4:9: resources.spot: expected true, false or auto, got 'maybe'"]),
    ("max-price-negative", HEAD + "resources:\n  max_price: -2\n",
     ["job.yaml:4:14: resources.max_price: must not be negative, got -2"]),
    ("zone-outside-regions", HEAD + "resources:\n  regions: [us-east-1]\n  zones: [us-east-1a, eu-west-1b]\n",
     ["job.yaml:5:23: resources.zones[1]: zone 'eu-west-1b' is in none of the allowed regions (us-east-1); "
      "add its region or leave it out"]),
    ("workdir-missing", HEAD + "workdir: src\n",
     ["job.yaml:3:10: workdir: folder '{tmp}/src' does not exist (relative to the spec's folder {tmp})"]),
    ("workdir-is-a-file", HEAD + "workdir: train.py\n",
     ["job.yaml:3:10: workdir: '{tmp}/train.py' is a file, expected a folder"]),
    ("env-bad-name", HEAD + "env:\n  1BAD: x\n",
     ["job.yaml:4:3: env.1BAD: invalid variable name '1BAD'; use letters, digits and '_', not starting with "
      "a digit"]),
    ("env-reserved-name", HEAD + "env:\n  SPOTRUN_JOB_ID: x\n",
     ["job.yaml:4:3: env.SPOTRUN_JOB_ID: names starting with SPOTRUN_ are reserved for spotrun"]),
    ("env-variable-not-set", HEAD + "env:\n  HF_TOKEN: ${HF_TOKEN}\n",
     ["job.yaml:4:13: env.HF_TOKEN: environment variable HF_TOKEN is not set; set it before launching or "
      "write ${HF_TOKEN:-default} to give a default"]),
    ("env-null-value", HEAD + "env:\n  EMPTY:\n",
     ["job.yaml:4:9: env.EMPTY: expected text, a number or true/false, got null (write '' for an empty value)"]),
    ("env-bad-reference", HEAD + "env:\n  A: ${A B}\n",
     ["job.yaml:4:6: env.A: invalid reference '${A B}'; use ${NAME} or ${NAME:-default}"]),
    ("env-a-list", HEAD + "env: [A, B]\n", ["job.yaml:3:6: env: expected a mapping of NAME: value, got a list"]),
    ("data-source-missing", HEAD + "data:\n  ./corpus: corpus\n",
     ["job.yaml:4:3: data['./corpus']: data source '{tmp}/corpus' does not exist (relative to the spec's "
      "folder {tmp})"]),
    ("data-bad-scheme", HEAD + "data:\n  http://example.com/c4: c4\n",
     ["job.yaml:4:3: data['http://example.com/c4']: unsupported data source scheme 'http://' in "
      "'http://example.com/c4'; allowed: s3://, gs://, az://, file://"]),
    ("data-no-bucket", HEAD + "data:\n  s3:///c4: c4\n",
     ["job.yaml:4:3: data['s3:///c4']: 's3:///c4' names no bucket; write s3://BUCKET/PATH"]),
    ("data-target-escapes", HEAD + "data:\n  s3://b/c4: ../c4\n",
     ["job.yaml:4:14: data['s3://b/c4']: relative target '../c4' must stay inside SPOTRUN_DATA_DIR (no '..')"]),
    ("data-two-sources-one-target", HEAD + "data:\n  s3://b/a: c4\n  gs://b/a: c4\n",
     ["job.yaml:5:13: data['gs://b/a']: target 'c4' is also the target of 's3://b/a'"]),
    ("checkpoint-dir-relative", HEAD + "checkpoint: {dir: ckpt}\n",
     ["job.yaml:3:19: checkpoint.dir: must be an absolute path inside the container, like '/checkpoints'; "
      "got 'ckpt'"]),
    ("checkpoint-keep-zero", HEAD + "checkpoint: {keep: 0}\n",
     ["job.yaml:3:20: checkpoint.keep: must be 1 or more, got 0"]),
    ("checkpoint-interval-unit", HEAD + "checkpoint: {interval: 5 parsecs}\n",
     ["job.yaml:3:24: checkpoint.interval: unknown duration unit 'parsecs' in '5 parsecs'; use w, d, h, m, s "
      "or ms (e.g. 2h30m; a plain number means seconds)"]),
    ("recovery-negative-restarts", HEAD + "recovery:\n  max_restarts: -1\n",
     ["job.yaml:4:17: recovery.max_restarts: must be 0 or more, got -1"]),
    ("recovery-fallback-not-bool", HEAD + "recovery:\n  on_demand_fallback: 1\n",
     ["job.yaml:4:23: recovery.on_demand_fallback: expected true or false, got 1"]),
    ("budget-zero", HEAD + "budget: 0\n", ["job.yaml:3:9: budget: must be greater than 0, got 0"]),
    ("budget-euros", HEAD + "budget: €5\n",
     ["job.yaml:3:9: budget: only USD amounts are supported, got '€5'; use an amount in USD like $12.50 or 12.5"]),
    ("deadline-units-out-of-order", HEAD + "deadline: 30m2h\n",
     ["job.yaml:3:11: deadline: invalid duration '30m2h': give each unit once, largest first (e.g. 2h30m)"]),
    ("precision-unknown", HEAD + "workload:\n  precision: bf61\n",
     ["job.yaml:4:14: workload.precision: unknown precision 'bf61'; allowed: fp32, tf32, bf16, fp16, int8 "
      "(did you mean 'bf16'?)"]),
    ("model-params-bare-7", HEAD + "workload:\n  model_params: 7\n",
     ["job.yaml:4:17: workload.model_params: 7 parameters is implausibly few; write 7B for 7 billion or 7M "
      "for 7 million"]),
    ("hours-on-unknown-gpu", HEAD + "workload:\n  hours_on: {A100: 10, Z9: 3}\n",
     [f"job.yaml:4:24: workload.hours_on.Z9: unknown GPU 'Z9'; allowed: {GPUS}"]),
    ("store-bad-scheme", HEAD + "store: ftp://host/x\n",
     ["job.yaml:3:8: store: unsupported store scheme 'ftp://' in 'ftp://host/x'; allowed: file://, s3://, "
      "gs://, az://"]),
    ("store-bare-path", HEAD + "store: /var/spotrun\n",
     ["job.yaml:3:8: store: expected a URI starting with file://, s3://, gs:// or az://, got '/var/spotrun'"]),
    ("local-market-missing", HEAD + "local:\n  market: market.yaml\n",
     ["job.yaml:4:11: local.market: market file '{tmp}/market.yaml' does not exist (relative to the spec's "
      "folder {tmp})"]),
    ("aws-region-with-space", HEAD + "aws: {region: us east 1}\n",
     ["job.yaml:3:15: aws.region: must not contain spaces, got 'us east 1'"]),
    ("resources-a-string", HEAD + "resources: A100\n", ["job.yaml:3:12: resources: expected a mapping, got 'A100'"]),
    ("loader-field-in-yaml", HEAD + "base_dir: /etc\n", [f"job.yaml:3:1: base_dir: unknown key 'base_dir'; "
                                                         f"allowed: {TOP_KEYS}"]),
    ("duplicate-key", "name: demo\nrun: a\nrun: b\n",
     ["job.yaml:3:1: run: duplicate key 'run' (first given on line 2)"]),
    ("unsupported-tag", HEAD + "image: !!python/object:os.system x\n",
     ["job.yaml:3:8: image: unsupported YAML tag '!!python/object:os.system'; remove it"]),
    ("tab-indent", HEAD + "resources:\n\tgpu: A100\n",
     ["job.yaml:4:1: invalid YAML: a tab character; YAML does not allow tabs for indentation, use spaces"]),
    ("yaml-syntax", "name: demo: x\nrun: b\n", ["job.yaml:1:11: invalid YAML: mapping values are not allowed here"]),
    ("unclosed-flow", "name: demo\nrun: [a\n",
     ["job.yaml:3:1: invalid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence "
      "at line 2, column 6)"]),
    ("two-documents", HEAD + "---\nname: other\n",
     ["job.yaml:3:1: invalid YAML: a second document ('---'); a job spec is a single YAML document"]),
    ("top-level-list", "- name: demo\n- run: x\n",
     ["job.yaml:1:1: expected a mapping of keys at the top level (like 'name: my-job'), got a list"]),
    ("top-level-text", "just some words\n",
     ["job.yaml:1:1: expected a mapping of keys at the top level (like 'name: my-job'), got 'just some words'"]),
    ("empty-file", "", ["job.yaml:1:1: the file is empty; a job spec needs at least 'name' and 'run'"]),
    ("only-comments", "# nothing here\n", ["job.yaml:1:1: the file is empty; a job spec needs at least 'name' "
                                           "and 'run'"]),
    ("nul-byte", "name: demo\x00\nrun: x\n",
     ["job.yaml:1:11: not a YAML text file: unacceptable character #x0000 (special characters are not "
      "allowed)"]),
    ("alias-bomb", "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcde", "bcdef", strict=True)),
     ["job.yaml:1:1: the YAML expands to more than 20000 values (aliases?)"]),
    ("recursive-alias", HEAD + "env: &x\n  A: *x\n", ["job.yaml:3:6: env.A: a YAML alias refers to itself"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_exact_message(tmp_path: Path, text: str, expected: list[str]) -> None:
    (tmp_path / "train.py").write_text("print('hi')\n")
    assert errors(text, tmp_path) == [line.replace("{tmp}", str(tmp_path)) for line in expected]


def test_there_are_many_bad_specs() -> None:
    assert len(BAD_SPECS) >= 25
    assert len({c[0] for c in BAD_SPECS}) == len(BAD_SPECS)


def test_every_problem_is_reported_at_once_in_file_order(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """\
        name: Bad Name
        resources:
          gpu: A1OO
          cpus: many
          spot: perhaps
        env:
          OK: fine
          2X: y
        budget: -5
        recovery: {max_restarts: two}
        retries: 3
        """
    )
    assert errors(text, tmp_path) == [
        "job.yaml:1:1: run: required key is missing (the command that starts training, like 'python train.py')",
        "job.yaml:1:7: name: invalid name 'Bad Name'; use 1-63 lowercase letters, digits and '-', starting "
        "with a letter and ending with a letter or digit (e.g. 'bad-name')",
        f"job.yaml:3:8: resources.gpu: unknown GPU 'A1OO'; allowed: {GPUS} (did you mean 'A100'?)",
        "job.yaml:4:9: resources.cpus: expected a whole number, got 'many'",
        "job.yaml:5:9: resources.spot: expected true, false or auto, got 'perhaps'",
        "job.yaml:8:3: env.2X: invalid variable name '2X'; use letters, digits and '_', not starting with a digit",
        "job.yaml:9:9: budget: must not be negative, got -5",
        "job.yaml:10:26: recovery.max_restarts: expected a whole number, got 'two'",
        f"job.yaml:11:1: retries: unknown key 'retries'; allowed: {TOP_KEYS} (did you mean 'recovery.max_restarts'?)",
    ]
    with pytest.raises(SpecError) as caught:
        parse_spec_text(text, "job.yaml", base_dir=tmp_path, environ={})
    first = caught.value.issues[0]
    assert (first.file, first.line, first.column, first.key_path) == ("job.yaml", 1, 1, "run")


def test_minimal_spec_gets_the_documented_defaults(tmp_path: Path) -> None:
    spec = parse_spec_text(HEAD, "job.yaml", base_dir=tmp_path, environ={})
    assert spec.name == "demo" and spec.run == "python train.py"
    assert spec.resources.gpu is None and spec.resources.disk == 100.0 and spec.resources.spot is True
    assert spec.resources.providers is None and spec.resources.max_price is None
    assert spec.checkpoint.dir == "/checkpoints" and spec.checkpoint.keep == 3 and spec.checkpoint.interval is None
    assert spec.recovery.max_restarts == 3 and spec.recovery.max_preemptions is None
    assert spec.recovery.zone_cooldown == 1800.0 and spec.recovery.on_demand_fallback is True
    assert spec.env == {} and spec.data == {} and spec.secret_env_keys == set()
    assert spec.workdir is None and spec.image is None and spec.setup is None and spec.workload is None
    assert spec.budget is None and spec.deadline is None and spec.store is None
    assert spec.base_dir == tmp_path.resolve() and spec.source_path is None


FULL = """\
# every key, in the forms people write them
x-common-env: &common
  WANDB_PROJECT: llama
name: llama-finetune
resources:
  gpu: {name: a100, count: 8, memory: 80GB}
  cpus: 32
  memory: 256GB
  disk: 1.5TiB
  providers: [AWS, gcp]
  regions: ["us-*", europe-west4]
  zones: [us-east-1a, "europe-west4-*"]
  spot: auto
  max_price: $25/h
workdir: src
image: nvcr.io/nvidia/pytorch:24.05-py3
setup: pip install -r requirements.txt
run: |
  torchrun --nproc-per-node 8 train.py
env:
  <<: *common
  HF_TOKEN: ${HF_TOKEN}
  LR: 3.0e-4
  VERSION: 1.10
  DEBUG: yes
  HOME_DIR: ${UNSET_VAR:-/root}
  LITERAL: $${NOT_EXPANDED}
data:
  corpus: corpus
  s3://my-bucket/datasets/c4: /mnt/c4
checkpoint: {dir: /ckpt, interval: 30m, keep: 2}
recovery: {max_restarts: 5, max_preemptions: 20, zone_cooldown: 1h, on_demand_fallback: false}
budget: $1,250.50
deadline: 2d
workload:
  model_params: 7B
  precision: BF16
  optimizer: adamw
  hours: 90m
  hours_on: {A100: 10, h100-80gb: 4.5}
  checkpoint_gb: 84GB
  data_gb: 1.5TB
store: s3://my-bucket/spotrun
local: {market: market.yaml}
aws: {region: us-east-1, ami: ami-0123, subnet_id: subnet-1}
gcp: {project: 123456789}
azure: {subscription_id: 0000-1111, resource_group: rg}
"""


def _project(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "corpus").mkdir()
    from spotrun.clouds.local.market import builtin_market_path

    # a real market file: a broken one now fails validation (issue 13)
    (tmp_path / "market.yaml").write_text(builtin_market_path("quickstart").read_text())
    path = tmp_path / "job.yaml"
    path.write_text(FULL)
    return path


def test_full_spec_loads_with_units_paths_and_names_normalized(tmp_path: Path) -> None:
    spec = load_spec(_project(tmp_path), environ={"HF_TOKEN": "hf_secret"})
    base = tmp_path.resolve()
    assert spec.source_path == base / "job.yaml" and spec.base_dir == base
    r = spec.resources
    assert (r.gpu.name, r.gpu.count, r.gpu.memory) == ("A100", 8, 80.0)  # type: ignore[union-attr]
    assert (r.cpus, r.memory, r.disk) == (32, 256.0, pytest.approx(1649.267441664))
    assert r.providers == ["aws", "gcp"] and r.regions == ["us-*", "europe-west4"]
    assert r.zones == ["us-east-1a", "europe-west4-*"] and r.spot == "auto" and r.max_price == 25.0
    assert spec.workdir == base / "src" and spec.image == "nvcr.io/nvidia/pytorch:24.05-py3"
    assert spec.run == "torchrun --nproc-per-node 8 train.py\n"
    assert spec.env == {
        "WANDB_PROJECT": "llama",
        "HF_TOKEN": "hf_secret",
        "LR": "3.0e-4",
        "VERSION": "1.10",  # the source text, not the float 1.1
        "DEBUG": "yes",  # not 'True'
        "HOME_DIR": "/root",
        "LITERAL": "${NOT_EXPANDED}",
    }
    assert spec.secret_env_keys == {"HF_TOKEN", "HOME_DIR"}
    assert spec.data == {str(base / "corpus"): "corpus", "s3://my-bucket/datasets/c4": "/mnt/c4"}
    assert (spec.checkpoint.dir, spec.checkpoint.interval, spec.checkpoint.keep) == ("/ckpt", 1800.0, 2)
    assert spec.recovery.model_dump() == {
        "max_restarts": 5, "max_preemptions": 20, "zone_cooldown": 3600.0, "on_demand_fallback": False,
        "policy": "spotrun", "capacity_wait": 600.0, "max_boot_failures": 3, "boot_timeout": None,
    }  # fmt: skip
    assert spec.budget == 1250.5 and spec.deadline == 172800.0
    w = spec.workload
    assert w is not None and w.model_params == 7e9 and w.precision == "bf16" and w.optimizer == "adamw"
    assert w.hours == 1.5 and w.hours_on == {"A100": 10.0, "H100": 4.5}
    assert w.checkpoint_gb == 84.0 and w.data_gb == 1500.0
    assert spec.store == "s3://my-bucket/spotrun" and spec.local and spec.local.market == base / "market.yaml"
    assert spec.aws and spec.aws.region == "us-east-1" and spec.aws.instance_profile is None
    assert spec.gcp and spec.gcp.project == "123456789"
    assert spec.azure and spec.azure.subscription_id == "0000-1111"


def test_persisted_form_never_holds_secret_values_and_reloads(tmp_path: Path) -> None:
    spec = load_spec(_project(tmp_path), environ={"HF_TOKEN": "hf_secret"})
    saved = spec.persistable()
    assert "hf_secret" not in json.dumps(saved)
    assert saved["secret_env_keys"] == ["HF_TOKEN", "HOME_DIR"]
    assert saved["env"]["HF_TOKEN"] == "${HF_TOKEN}" and saved["env"]["LITERAL"] == "$${NOT_EXPANDED}"

    # The files it named may be gone by the time a job resumes: they were uploaded already.
    (tmp_path / "market.yaml").unlink()
    again = JobSpec.from_persisted(json.loads(json.dumps(saved)), environ={"HF_TOKEN": "hf_secret"})
    assert again == spec and again.persistable() == saved

    with pytest.raises(SpecError) as caught:
        JobSpec.from_persisted(saved, environ={})
    assert str(caught.value) == (
        "<saved spec>: env.HF_TOKEN: environment variable HF_TOKEN is not set; set it before launching or "
        "write ${HF_TOKEN:-default} to give a default"
    )


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        ("A100", ("A100", 1, None)),
        ("a100:1", ("A100", 1, None)),
        ("H100:8", ("H100", 8, None)),
        ("A100-80GB:2", ("A100", 2, 80.0)),
        ("nvidia-tesla-t4", ("T4", 1, None)),
        ({"name": "l4", "count": 4}, ("L4", 4, None)),
        ({"memory": "40GB", "count": 2}, (None, 2, 40.0)),
        ({"name": "A100", "memory": "80GiB"}, ("A100", 1, 80.0)),  # 85.9 GB, but it means the 80 GB part
        ({"memory": "24GiB"}, (None, 1, 24.0)),
        ({"name": "V100", "memory": "20GB"}, ("V100", 1, 20.0)),  # more than 16: needs the 32 GB V100
    ],
)
def test_gpu_request_forms(tmp_path: Path, gpu: object, expected: tuple[object, ...]) -> None:
    text = HEAD + "resources:\n  gpu: " + json.dumps(gpu) + "\n"
    g = parse_spec_text(text, "job.yaml", base_dir=tmp_path, environ={}).resources.gpu
    assert g is not None and (g.name, g.count, g.memory) == expected


def test_spot_and_human_forms(tmp_path: Path) -> None:
    def load(extra: str) -> JobSpec:
        return parse_spec_text(HEAD + extra, "job.yaml", base_dir=tmp_path, environ={})

    assert load("resources: {spot: false, max_price: 3}\n").resources.spot is False  # max_price + on-demand: ok
    assert load("resources: {spot: AUTO}\n").resources.spot == "auto"
    assert load("resources: {providers: azure}\n").resources.providers == ["azure"]  # one string = one item
    assert load("resources: {regions: [eastus], zones: ['1', '2']}\n").resources.zones == ["1", "2"]
    with pytest.raises(SpecError, match="did you mean 12h"):  # a duration without a unit (issue 13)
        load("deadline: 12\n")
    with pytest.raises(SpecError, match="did you mean 40GB"):
        load("resources: {memory: 40}\n")
    assert load("deadline: 5400s\n").deadline == 5400.0
    assert load("budget: 12.5\n").budget == 12.5
    assert load("workload: {model_params: 1.3e9}\n").workload.model_params == 1.3e9  # type: ignore[union-attr]
    assert load("checkpoint:\nrecovery:\n").checkpoint.keep == 3  # an empty section means the defaults
    assert load("setup: ''\n").setup is None


def test_env_expansion_uses_the_launching_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEC_TEST_TOKEN", "from-os")
    text = HEAD + "env:\n  T: ${SPEC_TEST_TOKEN}\n  D: ${SPEC_TEST_UNSET:-dflt}\n  P: pre-${SPEC_TEST_TOKEN}-post\n"
    spec = parse_spec_text(text, "job.yaml", base_dir=tmp_path)  # environ defaults to os.environ
    assert spec.env == {"T": "from-os", "D": "dflt", "P": "pre-from-os-post"}
    assert spec.secret_env_keys == {"T", "D", "P"}


def test_data_sources_local_file_uri_and_absolute_targets(tmp_path: Path) -> None:
    (tmp_path / "shard.bin").write_bytes(b"x")
    text = HEAD + f"data:\n  shard.bin: shards/./a\n  file://{tmp_path}/shard.bin: /abs/b\n"
    errs = errors(text, tmp_path)
    assert errs == [f"job.yaml:5:3: data['file://{tmp_path}/shard.bin']: the same source as 'shard.bin'; give it once"]
    spec = parse_spec_text(
        HEAD + f"data:\n  file://{tmp_path}/shard.bin: shards/./a\n", "job.yaml", base_dir=tmp_path, environ={}
    )
    assert spec.data == {str(tmp_path.resolve() / "shard.bin"): "shards/a"}


def test_load_spec_file_problems(tmp_path: Path) -> None:
    def message(path: Path) -> str:
        with pytest.raises(SpecError) as caught:
            load_spec(path)
        return str(caught.value)

    assert message(tmp_path / "nope.yaml") == f"{tmp_path}/nope.yaml: file not found"
    assert message(tmp_path) == f"{tmp_path}: is a folder, expected a YAML file"
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(b"name: demo\nrun: \xff\xfe\x00\x01")
    assert message(junk) == f"{junk}:2:6: not a text file: byte 0xff is not valid UTF-8"
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    assert message(big) == f"{big}: too large for a job spec (over 1048576 bytes)"
    crlf_bom = tmp_path / "win.yaml"
    crlf_bom.write_bytes("\ufeffname: demo\r\nrun: python train.py\r\n".encode())
    assert load_spec(crlf_bom).run == "python train.py"


def test_closest_match() -> None:
    assert closest_match("A1OO", ["A10", "A100", "H100"]) == "A100"
    assert closest_match("resorces", ["resources", "recovery"]) == "resources"
    assert closest_match("RUN", ["run"]) == "run"
    assert closest_match("zzz", ["run"]) is None


GARBAGE: dict[str, bytes] = {
    "binary.yaml": bytes(range(256)) * 4,
    "png.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "tabs.yaml": b"name: a\n\trun: b\n",
    "list.yaml": b"- 1\n- 2\n",
    "empty.yaml": b"",
    "dupes.yaml": b"name: a\nname: b\nrun: x\n",
    "deep.yaml": b"name: " + b"[" * 20000 + b"]" * 20000 + b"\n",
    "deepmap.yaml": b"a:\n" + b"".join(b" " * i + b"b:\n" for i in range(1, 1000)),
    "json.yaml": b'{"name": "a", "run": "b", "resources": {"gpu": {"count": "x"}}}',
    "utf16.yaml": "name: a\nrun: b\n".encode("utf-16"),
    "control.yaml": b"name: a\x07\nrun: b\n",
    "python-tag.yaml": b"!!python/object/apply:os.system ['echo pwned']\n",
    "huge-int.yaml": b"name: a\nrun: b\nresources: {cpus: " + b"9" * 5000 + b"}\n",
    "weird-keys.yaml": b"? [a, b]\n: 1\n? {x: 1}\n: 2\nnull: 3\n1: 4\n",
    "anchors.yaml": b"a: &a [*a]\n",
    "bad-explicit-tag.yaml": b"name: a\nrun: b\nbudget: !!float abc\n",
}


def test_no_traceback_ever_reaches_the_user(tmp_path: Path) -> None:
    """Each garbage file is loaded in a fresh interpreter the way the CLI does; the only thing that may
    come out is SpecError's text."""
    for name, content in GARBAGE.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder.yaml").mkdir()
    names = [*GARBAGE, "folder.yaml", "missing.yaml"]
    script = textwrap.dedent(
        """\
        import sys
        from spotrun.spec import SpecError, load_spec
        for path in sys.argv[1:]:
            try:
                load_spec(path)
            except SpecError as err:
                assert err.issues, path
                print(err)
            else:
                print(path + ": LOADED")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *(str(tmp_path / n) for n in names)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "LOADED" not in result.stdout
    assert "internal error" not in result.stdout
    for name in names:
        assert f"{tmp_path / name}" in result.stdout


def test_mutated_specs_only_ever_raise_spec_error(tmp_path: Path) -> None:
    """Random byte edits of a full spec: each one either loads or raises SpecError, never anything else
    (and never the internal-error fallback)."""
    _project(tmp_path)
    source = FULL.encode()
    rng = random.Random(1234)
    loaded = refused = 0
    for _ in range(150):
        data = bytearray(source)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[pos] = rng.choice(b" :-[]{}\t\n#&*!|>'\"%@`,?0aZ$\xff")
            elif op < 0.7:
                del data[pos : pos + rng.randint(1, 8)]
            else:
                data[pos:pos] = bytes(rng.choice(b" :-[]{}\n") for _ in range(rng.randint(1, 3)))
        path = tmp_path / "job.yaml"
        path.write_bytes(bytes(data))
        try:
            load_spec(path, environ={"HF_TOKEN": "x"})
            loaded += 1
        except SpecError as err:
            assert err.issues and all(isinstance(i, SpecIssue) for i in err.issues)
            assert "internal error" not in str(err), str(err)
            refused += 1
    assert loaded and refused


def test_unknown_relaunch_policy_lists_the_known_ones(tmp_path):
    with pytest.raises(SpecError) as err:
        parse_spec_text("name: x\nrun: t\nrecovery:\n  policy: yolo\n", "job.yaml", base_dir=tmp_path)
    assert str(err.value) == (
        "job.yaml:4:11: recovery.policy: unknown policy 'yolo'; "
        "allowed: on-demand, greedy, failover, uniform-progress, spotrun"
    )


def test_boot_failure_settings_take_units_and_refuse_nonsense(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        'name: x\nrun: python train.py\nresources: {gpu: "T4:1"}\nrecovery: {max_boot_failures: 5, boot_timeout: 20m}\n'
    )
    spec = load_spec(path)
    assert (spec.recovery.max_boot_failures, spec.recovery.boot_timeout) == (5, 1200.0)
    path.write_text('name: x\nrun: python train.py\nresources: {gpu: "T4:1"}\nrecovery: {max_boot_failures: 0}\n')
    with pytest.raises(SpecError, match="max_boot_failures"):
        load_spec(path)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=str)
def test_every_shipped_config_validates(path: Path) -> None:
    """The example specs in configs/ are what users copy: each must pass `spotrun validate`."""
    load_spec(path, environ={"WANDB_API_KEY": "x", "HF_TOKEN": "x"})
