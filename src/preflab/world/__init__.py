"""The built-in tutoring world: prompts, a known true utility, corpora and (simulated) annotators."""

from preflab.world.tutor import (
    COMPONENTS,
    KINDS,
    Task,
    Utility,
    all_tasks,
    corpus,
    demonstrations,
    kind_of,
    prompts,
    question_of,
    task_for,
    true_utility,
)

__all__ = [
    "COMPONENTS",
    "KINDS",
    "Task",
    "Utility",
    "all_tasks",
    "corpus",
    "demonstrations",
    "kind_of",
    "prompts",
    "question_of",
    "task_for",
    "true_utility",
]
