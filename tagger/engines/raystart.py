"""Joining or starting Ray for a run: its import, a local instance on 127.0.0.1 only, quiet logs, one-line errors."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Iterator

from tagger.errors import TaggerError, one_line

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger("tagger.engines.ray")  # the engine's logger: its level decides how quiet Ray is

INSTALL_HINT = "--engine ray needs Ray, which is not installed: pip install 'tagger[ray]'"


def import_ray() -> ModuleType:
    """The ray module (with Ray Data), or a one-line TaggerError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  # the extra is ray[data]; plain ray lacks its dependencies
    except ImportError as e:
        log.debug("cannot import ray: %s", e)
        raise TaggerError(INSTALL_HINT) from None
    return ray


# Ray turns a node address of 127.0.0.1 into the machine's outward one and then listens on every interface; a
# single-machine instance (this switch, which Ray reads at import and Ray's processes read from the environment)
# keeps 127.0.0.1, and every Ray process then listens there only.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local Ray instance starts: its node address stays 127.0.0.1 (see SINGLE_MACHINE_ENV)."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


@contextlib.contextmanager
def _started_in(folder: str) -> Iterator[None]:
    """Run ray.init from `folder`: Ray puts the driver's working directory first on every worker's import path, and
    the processes of a local instance work there."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


@contextlib.contextmanager
def _without_core_level_line() -> Iterator[None]:
    """Ray's C++ core announces on stderr that it read RAY_CORE_LOG_ENV as it starts in this process (in ray.init):
    that line is dropped, whatever else is written to stderr meanwhile is passed on after."""
    if os.environ.get(RAY_CORE_LOG_ENV) != QUIET_CORE_LEVEL:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if f"environment variable {RAY_CORE_LOG_ENV}" not in line:
                    sys.stderr.write(line)
            sys.stderr.flush()


@contextlib.contextmanager
def connected(ray: ModuleType, address: str | None, num_cpus: int) -> Iterator[None]:
    """Use an already initialised Ray (a notebook's, a test's), else join `address` or start a local instance of
    num_cpus logical CPUs."""
    if ray.is_initialized():
        yield
        return
    # Workers' output comes back to the driver's stderr with -v only; a worker's error still reaches it as one.
    verbose = log.getEffectiveLevel() <= logging.INFO
    quiet: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": verbose}
    # Started from an empty folder, not the user's: one holding a folder named tagger/ (a checkout, say) would
    # shadow the installed package in every worker.
    empty = tempfile.mkdtemp(prefix="tagger-ray-")
    try:
        if address:
            try:
                with _started_in(empty), _without_core_level_line():
                    ray.init(address=address, **quiet)
            except ConnectionError as e:
                raise TaggerError(f"cannot join the Ray cluster at {address}: {_last_line(e)}") from None
        else:
            # address="local": a bare ray.init() would join a cluster that `ray start` left on this machine.
            with _started_in(empty), _loopback_only(), _without_core_level_line():
                ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, **quiet)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(empty, ignore_errors=True)  # after the local instance's processes have stopped


RAY_LOGGERS = ("ray", "ray.data")  # the driver's Python loggers of Ray and Ray Data (executor, progress lines)
# The level of Ray's C++ core, which logs to stderr outside Python's logging: on every run it prints an error-level
# line about actor arguments kept in the object store, and on some machines a memory-monitor warning, neither of
# which is the user's business. Read when Ray starts its processes and the driver's core worker.
RAY_CORE_LOG_ENV = "RAY_BACKEND_LOG_LEVEL"
QUIET_CORE_LEVEL = "fatal"


@contextlib.contextmanager
def quiet_ray_logs() -> Iterator[None]:
    """Ray's driver loggers no chattier than tagger's own (WARNING by default, ERROR with -q), and its C++ core
    silent but for fatal errors, unless tagger logs INFO (-v) or the user set RAY_CORE_LOG_ENV; the loggers' levels
    (which ray.init's logging_level also sets) and the environment restored after. Ray Data logs INFO to stderr by
    default: its plan, and progress lines when stderr is no terminal. A failed run still says why: Ray's errors
    reach tagger as exceptions."""
    level = log.getEffectiveLevel()
    loggers = [logging.getLogger(name) for name in RAY_LOGGERS]
    saved = [lg.level for lg in loggers]
    quiet_core = level > logging.INFO and RAY_CORE_LOG_ENV not in os.environ
    if level > logging.INFO:
        for lg in loggers:
            lg.setLevel(max(lg.getEffectiveLevel(), level))
    if quiet_core:
        os.environ[RAY_CORE_LOG_ENV] = QUIET_CORE_LEVEL
    try:
        yield
    finally:
        for lg, was in zip(loggers, saved):
            lg.setLevel(was)
        if quiet_core:
            os.environ.pop(RAY_CORE_LOG_ENV, None)


@contextlib.contextmanager
def unwrapped_errors(ray: ModuleType) -> Iterator[None]:
    """A TaggerError raised in a Ray worker comes back as itself; any other Ray failure as one line."""
    try:
        yield
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, TaggerError):
            raise e.cause from None
        raise TaggerError(f"the Ray run failed: {_last_line(e.cause)}") from None
    except ray.exceptions.RayError as e:
        raise TaggerError(f"the Ray run failed: {_last_line(e)}") from None


def _last_line(e: BaseException) -> str:
    """Ray's errors carry a remote traceback; its last line says what happened."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return one_line(RuntimeError(lines[-1])) if lines else type(e).__name__


@contextlib.contextmanager
def data_context(ray: ModuleType, progress: bool | None) -> Iterator[None]:
    """Ray Data's own progress bars unless progress is False (None leaves Ray's default); restored after."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    if progress is not None:
        ctx.enable_progress_bars = progress
    try:
        yield
    finally:
        ctx.enable_progress_bars = saved



__all__ = ["INSTALL_HINT", "connected", "data_context", "import_ray", "quiet_ray_logs", "unwrapped_errors"]
