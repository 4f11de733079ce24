"""The bubblewrap command line: what a run can see, and nothing else."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from aivax.sandbox.schemas import Limits

# The run's identity inside its user namespace; /etc/passwd and /etc/group say the same.
SANDBOX_UID = 1000
SANDBOX_GID = 1000
WORKSPACE = "/workspace"
ENVIRONMENT = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKSPACE,
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",  # noqa: S108 - the sandbox's own size-limited tmpfs
    "USER": "sandbox",
}
# Top-level system directories shown read-only (or as the links they are on merged-/usr hosts).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The part of /etc that the dynamic loader, bash, coreutils and Python read. Never the host's
# users, groups, passwords, hosts or application configuration.
ETC_ENTRIES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/mime.types",
)
ETC_GLOBS = ("/etc/python3*",)
PASSWD = f"sandbox:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox:{WORKSPACE}:/bin/bash\n"
GROUP = f"sandbox:x:{SANDBOX_GID}:\n"
HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost\n"


@dataclass(frozen=True)
class DataFiles:
    """Descriptors of the synthetic /etc files, read by bwrap to their end."""

    passwd: int
    group: int
    hosts: int

    def fds(self) -> tuple[int, ...]:
        return (self.passwd, self.group, self.hosts)

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)


def data_files() -> DataFiles:
    return DataFiles(_memfd("passwd", PASSWD), _memfd("group", GROUP), _memfd("hosts", HOSTS))


def _memfd(name: str, content: str) -> int:
    fd = os.memfd_create(f"aivax-sandbox-{name}")
    os.write(fd, content.encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def system_mounts() -> list[str]:
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    etc = [*ETC_ENTRIES, *sorted(p for pattern in ETC_GLOBS for p in glob.glob(pattern))]
    for path in etc:
        args += ["--ro-bind-try", path, path]
    return args


def bwrap_argv(
    bwrap: Path,
    *,
    command: list[str],
    limits: Limits,
    workspace_fd: int,
    info_fd: int,
    data: DataFiles,
) -> list[str]:
    """Namespaces: user, PID (bwrap is its init: when it goes, every process of the run goes),
    IPC, UTS, network (loopback only) and cgroup. The root is a tmpfs made read-only once
    built; /tmp and /dev/shm are small tmpfs; the workspace is the one writable directory.
    The process limits are set inside the namespaces by prlimit, so the process count is the
    run's own (RLIMIT_NPROC counts per user namespace), not the host user's."""
    env = [arg for name, value in ENVIRONMENT.items() for arg in ("--setenv", name, value)]
    return [
        str(bwrap),
        *("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"),
        *("--unshare-net", "--unshare-cgroup-try", "--disable-userns"),
        *("--die-with-parent", "--as-pid-1", "--new-session", "--cap-drop", "ALL"),
        *("--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID), "--hostname", "sandbox"),
        *system_mounts(),
        *("--ro-bind-data", str(data.passwd), "/etc/passwd"),
        *("--ro-bind-data", str(data.group), "/etc/group"),
        *("--ro-bind-data", str(data.hosts), "/etc/hosts"),
        *("--proc", "/proc", "--dev", "/dev"),
        *("--size", str(limits.tmp_bytes), "--tmpfs", "/dev/shm"),  # noqa: S108
        *("--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"),  # noqa: S108
        *("--remount-ro", "/dev"),
        *("--bind-fd", str(workspace_fd), WORKSPACE, "--chdir", WORKSPACE),
        *("--remount-ro", "/"),
        *("--info-fd", str(info_fd), "--clearenv", *env),
        "--",
        *prlimit_argv(limits),
        *AS_CHILD_OF_INIT,
        *command,
    ]


# bwrap runs with --as-pid-1 so that it reaps the run's init itself and its resource usage
# counts the whole run. The command is a child of that init, not the init: a process 1 ignores
# signals it has no handler for (`kill $$` would do nothing), and orphans are reaped by the init.
AS_CHILD_OF_INIT = ("/bin/sh", "-c", '"$@"; exit $?', "sh")


def prlimit_argv(limits: Limits) -> list[str]:
    return [
        "/usr/bin/prlimit",
        f"--nproc={limits.processes}",
        f"--as={limits.memory_bytes}",
        f"--cpu={limits.cpu_seconds}",
        f"--fsize={limits.file_bytes}",
        f"--nofile={limits.open_files}",
        "--core=0",
        "--",
    ]
