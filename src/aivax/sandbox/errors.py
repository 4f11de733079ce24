"""What the sandbox refuses, as `AppError`s a caller may let through to a client."""

from __future__ import annotations

from aivax.errors import AppError, BadRequest, ServiceUnavailable


class SandboxUnavailable(ServiceUnavailable):
    """bubblewrap is missing or cannot create its namespaces on this host: untrusted code is
    never run without it, so Bash and code execution are off."""

    code = "sandbox_unavailable"


class WorkspaceFull(AppError):
    """The workspace already holds more than its limit: nothing runs until files are removed."""

    status = 400
    code = "sandbox_workspace_full"
    should_retry = False


class SandboxNetworkUnsupported(BadRequest):
    """Commands run without a network; a proxied network is not offered yet."""

    code = "sandbox_network_unavailable"
