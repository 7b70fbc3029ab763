"""The built-in tutoring world: prompts, a known true utility, corpora and (simulated) annotators."""

from preflab.world.tutor import (
    COMPONENTS,
    Task,
    Utility,
    all_tasks,
    corpus,
    demonstrations,
    prompts,
    question_of,
    task_for,
    true_utility,
)

__all__ = [
    "COMPONENTS",
    "Task",
    "Utility",
    "all_tasks",
    "corpus",
    "demonstrations",
    "prompts",
    "question_of",
    "task_for",
    "true_utility",
]
