"""Click option types of the CLI: sizes in bytes, repeated NAME=VALUE options."""

from __future__ import annotations

from typing import Any, Callable

import click


class Bytes(click.ParamType):
    """A size in bytes: 4GiB, 512MiB, 1.5GB, or a plain number of bytes."""

    name = "size"
    UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        try:
            n = int(float(number) * self.UNITS[text[len(number):]])
        except (KeyError, ValueError, OverflowError):  # OverflowError: inf
            self.fail(f"expected a size such as 4GiB, 512MiB or a number of bytes, got {value!r}", param, ctx)
        if n < 1:
            self.fail(f"must be at least 1 byte, got {value!r}", param, ctx)
        return n


def pairs(values: tuple[str, ...], option: str, convert: Callable[[str], Any] = str) -> tuple[tuple[str, Any], ...]:
    """Parse repeated NAME=VALUE options."""
    out = []
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise click.BadParameter(f"expected NAME=VALUE, got {v!r}", param_hint=option)
        try:
            out.append((name, convert(value)))
        except ValueError:
            raise click.BadParameter(f"bad value in {v!r}", param_hint=option) from None
    return tuple(out)


def task_ints(values: tuple[str, ...], option: str, tasks: tuple[tuple[str, Any], ...], low: int) -> tuple[tuple[str, int], ...]:
    """Parse repeated NAME=N options for tasks named by --task."""
    out = pairs(values, option, int)
    names = [n for n, _ in tasks]
    for name, n in out:
        if name not in names:
            raise click.BadParameter(f"{name!r} is not a --task of this run ({', '.join(names) or 'none'})", param_hint=option)
        if n < low:
            raise click.BadParameter(f"{name}={n}: must be at least {low}", param_hint=option)
    return out


__all__ = ["Bytes", "pairs", "task_ints"]
