"""Process trees from Linux /proc, for tests and benchmarks: who is below a process, is it alive, what did it cost."""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[bytes]:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def descendants(root: int) -> list[int]:
    """root and every process below it, from /proc/<pid>/stat parent ids."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def alive(pid: int) -> bool:
    """Running (a zombie has exited: its parent, gone, can no longer reap it)."""
    try:
        return _stat_fields(pid)[0] != b"Z"
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (0.0 once it is gone, or where there is no /proc)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """The named kB values of /proc/<pid>/status (VmRSS, VmHWM, ...); those of a process gone are left out."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass  # exited meanwhile
    return out
