"""Where a stage's independent pieces of work run.

A stage hands its independent jobs (an activation shard, ...) to `fan_out`; by default they run here, one after
another. The orchestrator may install a mapper for the stage's duration (flows/scale.py: each job a Prefect task on
a Dask cluster); the stage never knows where its jobs run, and a job must give the same result either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Mapper(Protocol):
    def __call__(self, fn: Callable[[Any], Any], jobs: Sequence[Any], name: str) -> list[Any]: ...


_MAPPER: ContextVar[Mapper | None] = ContextVar("clearflow_mapper", default=None)


def fanned_out() -> bool:
    """Whether jobs leave this process (the stage then sends each job only what it needs)."""
    return _MAPPER.get() is not None


def fan_out(fn: Callable[[T], R], jobs: Sequence[T], name: str) -> list[R]:
    """fn(job) for every job, results in the jobs' order; `name` says what a job is (the UI's task name)."""
    mapper = _MAPPER.get()
    if mapper is None:
        return [fn(job) for job in jobs]
    return mapper(fn, list(jobs), name)


@contextmanager
def mapping_with(mapper: Mapper | None) -> Iterator[None]:
    """Send the jobs of the stage run inside to `mapper` (None: run them here)."""
    token = _MAPPER.set(mapper)
    try:
        yield
    finally:
        _MAPPER.reset(token)
