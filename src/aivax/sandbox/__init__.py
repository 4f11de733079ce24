"""The sandbox: untrusted commands (Bash, code execution, worker scripts) run only here, in
bubblewrap namespaces with rlimits, a wall-time kill and one writable workspace."""

from aivax.sandbox.errors import SandboxNetworkUnsupported, SandboxUnavailable, WorkspaceFull
from aivax.sandbox.schemas import Availability, Limits, RunResult
from aivax.sandbox.service import Sandbox
from aivax.sandbox.workspaces import Workspace, Workspaces

__all__ = [
    "Availability",
    "Limits",
    "RunResult",
    "Sandbox",
    "SandboxNetworkUnsupported",
    "SandboxUnavailable",
    "Workspace",
    "WorkspaceFull",
    "Workspaces",
]
