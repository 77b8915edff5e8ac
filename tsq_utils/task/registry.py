"""The tasks by name: what data.train and data.eval may name, and the task of a profile's training or evaluation.

Adding a task: subclass task.base.Task in a module of its own, and add its name(s) to TASKS below (or call
register_task from a notebook or a script).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import Task
from .benchmark import MathTask
from .data import BENCHMARKS
from .toy import ToyTask

# name -> factory(name): the toy world, and every math benchmark of task/data.py
TASKS: dict[str, Callable[[str], Task]] = {"toy": lambda name: ToyTask(), **{b: MathTask for b in BENCHMARKS}}


def register_task(names: Sequence[str], factory: Callable[[str], Task]) -> None:
    """Make get_task(name) build factory(name) for each of names; a name that is taken is refused."""
    for name in names:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered already")
        TASKS[name] = factory


def task_names() -> list[str]:
    """Every registered task name."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task a profile names in data.train or data.eval; ValueError naming the known ones otherwise."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}: known tasks are {', '.join(TASKS)}")
    return TASKS[name](name)


def benchmark_list(value: str | list | None) -> list[str] | None:
    """Task names (data.eval) from a comma-separated string (a papermill parameter) or a list; None stays None."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise ValueError(f"benchmarks {value!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                         f"known: {', '.join(TASKS)}")
    return names


def training_task(profile) -> Task:
    """The task of a profile's training problems (data.train)."""
    return get_task(profile.data.train)


def eval_tasks(profile) -> dict[str, Task]:
    """The tasks of a profile's evaluation benchmarks (data.eval), by name, in order."""
    return {name: get_task(name) for name in profile.data.eval}


def demo_task(profile) -> Task:
    """The task of notebook 00's worked example: the training task when it has an oracle (the toy world), else the
    first evaluation benchmark without one (a hub model is shown a real benchmark problem)."""
    train = training_task(profile)
    if train.has_oracle:
        return train
    task = next((t for t in eval_tasks(profile).values() if not t.has_oracle), None)
    if task is None:
        raise ValueError(f"profile {profile.name}: data.eval names no benchmark for a hub model ({profile.data.eval})")
    return task
