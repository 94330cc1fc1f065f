"""The HEAppE worker command template: its parameters and how values are encoded.

Why a module of its own: the template is a contract between two parties that
never meet at run time -- the centre's admin registers it once in HEAppE
(``command_template()``, docs/heappe.md), and ``HeappeProvider`` fills in its
parameters at every submission.  Keeping the parameter table, the
PreparationScript that maps parameters to the worker job's environment, and the
value encoding in one place keeps both sides of that contract in step (the HEAppE
test server reads the same table to play HEAppE's part).

HEAppE pastes values verbatim (``%%{id}``, no quoting) into the batch script, so
every value must match ``SAFE_VALUE`` (shell-inert in any quoting) and the
free-form ones (resources JSON, Ray token) travel base64-encoded.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.providers.base import WorkerSpec

DEFAULT_JOB_SCRIPT = Path(__file__).resolve().parent.parent / "worker_job.sh"


@dataclass(frozen=True)
class TemplateParameter:
    identifier: str      # HEAppE CommandParameterIdentifier (<= 20 chars)
    env: str             # the worker job's environment variable
    base64: bool         # value is base64 of the real value (free-form text)
    description: str


TEMPLATE_PARAMETERS: tuple[TemplateParameter, ...] = (
    TemplateParameter("headAddress", "HPCSERVE_HEAD_ADDRESS", False, "Ray GCS host:port"),
    TemplateParameter("allocationId", "HPCSERVE_ALLOCATION_ID", False, "hpcserve allocation id"),
    TemplateParameter("pool", "HPCSERVE_POOL", False, "hpcserve pool name"),
    TemplateParameter("numCpus", "HPCSERVE_NUM_CPUS", False, "CPUs Ray advertises"),
    TemplateParameter("numGpus", "HPCSERVE_NUM_GPUS", False, "GPUs Ray advertises"),
    TemplateParameter("walltimeS", "HPCSERVE_WALLTIME_S", False, "wall-time limit (s)"),
    TemplateParameter("warningS", "HPCSERVE_WARNING_S", False, "drain this long before the end"),
    TemplateParameter("resourcesB64", "HPCSERVE_RESOURCES", True, "base64 of the resources JSON"),
    TemplateParameter("rayTokenB64", "RAY_AUTH_TOKEN", True, "base64 of the Ray auth token"),
)
TOKEN_PARAMETER = "rayTokenB64"
SAFE_VALUE = re.compile(r"^[A-Za-z0-9._:@/+=,-]*$")  # inert in any shell quoting
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def preparation_script(include_token: bool = True) -> str:
    """The template's PreparationScript: exports the parameters as the job's env."""
    params = [p for p in TEMPLATE_PARAMETERS if include_token or p.identifier != TOKEN_PARAMETER]
    plain = " ".join(f"{p.env}=%%{{{p.identifier}}}" for p in params if not p.base64)
    coded = " ".join(f'{p.env}="$(echo %%{{{p.identifier}}} | base64 -d)"'
                     for p in params if p.base64)
    return (f"export {plain}; export {coded}; "
            "export HPCSERVE_WALLTIME_END=$(( $(date +%s) + HPCSERVE_WALLTIME_S ))")


def command_template(job_script: str | os.PathLike[str] = DEFAULT_JOB_SCRIPT,
                     include_token: bool = True) -> dict[str, Any]:
    """What an admin registers in HEAppE (CreateCommandTemplate fields)."""
    return {"Name": "hpcserve-worker", "Description": "hpcserve Ray worker joining the head",
            "ExecutableFile": f"bash {job_script}",
            "PreparationScript": preparation_script(include_token),
            "TemplateParameters": [
                {"Identifier": p.identifier, "Query": "", "Description": p.description}
                for p in TEMPLATE_PARAMETERS if include_token or p.identifier != TOKEN_PARAMETER]}


def template_values(spec: WorkerSpec, send_token: bool = True) -> dict[str, str]:
    """The template's parameter values for ``spec``, free-form ones base64-encoded.

    Not yet checked against ``SAFE_VALUE``: the provider checks them together with
    the site's extra parameters, so one error names whichever value is wrong.
    """
    values = {"headAddress": spec.head_address, "allocationId": spec.allocation_id,
              "pool": spec.pool, "numCpus": str(spec.num_cpus), "numGpus": str(spec.num_gpus),
              "walltimeS": str(int(spec.walltime_s)), "warningS": str(int(spec.warning_s)),
              "resourcesB64": b64(json.dumps(spec.resources, sort_keys=True,
                                             separators=(",", ":")))}
    if send_token:
        values[TOKEN_PARAMETER] = b64(spec.env.get("RAY_AUTH_TOKEN", ""))
    return values


def unsafe_template_value(values: Mapping[str, str]) -> str | None:
    """Why the first unsafe parameter value cannot be pasted into the script, or None."""
    for key, value in values.items():
        if not SAFE_VALUE.match(value) or len(value) > 1000:
            return (f"template parameter {key}={value!r} must be <= 1000 chars "
                    f"of [A-Za-z0-9._:@/+=,-] (HEAppE pastes it into a script)")
    return None


def unsafe_environment_variable(env: Mapping[str, str]) -> str | None:
    """Why the first task environment variable cannot travel through HEAppE, or None."""
    for key, value in env.items():
        if not _ENV_NAME.match(key) or not SAFE_VALUE.match(value) or len(value) > 2000:
            return (f"spec.env[{key!r}] cannot travel through HEAppE: names "
                    f"[A-Za-z_][A-Za-z0-9_]*, values of [A-Za-z0-9._:@/+=,-]")
    return None


def b64(text: str) -> str:
    """Base64 of UTF-8 text: the encoding the PreparationScript undoes with ``base64 -d``."""
    return base64.b64encode(text.encode()).decode()
