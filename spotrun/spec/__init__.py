"""The job spec: one YAML file describing a training job, parsed into typed pydantic models.

    spec = load_spec("job.yaml")        # -> JobSpec, or raises SpecError

Nothing is launched from a spec that did not validate, so the errors are the user interface:
each one names the file, line and column, the dotted key path, what was given and what is allowed,
every problem in the file is reported at once, and a mistyped key suggests the closest valid one.
The package: `models` (the keys), `fields` (their parsers), `load` (file -> models), `report`
(pydantic errors -> file:line:col problems), `issues` (the error types), `yamlpos`, `units`.
`str(SpecError)` renders one line per problem, e.g.

    job.yaml:12:5: resources.gpu: unknown GPU 'A1OO'; allowed: A10, A100, ... (did you mean 'A100'?)

How positions are kept: PyYAML composes the document into nodes that carry their marks; `Reader`
turns the node tree into plain Python values and, on the side, a map from each key path to where its
key and value start. Pydantic errors come back with a `loc` (the same key path), which the map turns
into a line and column. Validators that find several problems, or a problem below their own field
(a bad item in a list, a bad key in a mapping), raise `_Problems` carrying paths relative to the field.

Top-level keys starting with `x-` are ignored, so a spec can hold YAML anchors to reuse
(`x-common-env: &common {...}` then `env: {<<: *common, ...}`), as docker-compose files do.

Whatever the input (binary junk, tabs, duplicate keys, a list at the top level, a missing file),
`load_spec` raises `SpecError` and nothing else.
"""

from __future__ import annotations

from spotrun.spec.issues import SpecError, SpecIssue, closest_match
from spotrun.spec.load import MAX_SPEC_BYTES, load_spec, parse_spec_text
from spotrun.spec.models import (
    PROVIDERS,
    AWSOptions,
    AzureOptions,
    CheckpointSpec,
    GCPOptions,
    GpuRequest,
    JobSpec,
    LocalOptions,
    RecoverySpec,
    Resources,
    WorkloadHint,
)

__all__ = [
    "MAX_SPEC_BYTES",
    "PROVIDERS",
    "AWSOptions",
    "AzureOptions",
    "CheckpointSpec",
    "GCPOptions",
    "GpuRequest",
    "JobSpec",
    "LocalOptions",
    "RecoverySpec",
    "Resources",
    "SpecError",
    "SpecIssue",
    "WorkloadHint",
    "closest_match",
    "load_spec",
    "parse_spec_text",
]
