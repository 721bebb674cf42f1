"""Errors that ftkit reports to the user as they are, without a traceback."""

from __future__ import annotations


class FtkitError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class RecipeError(FtkitError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun} in the recipe:\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(FtkitError):
    pass


class AdapterMismatchError(FtkitError):
    pass


class BackendUnavailable(FtkitError):
    pass
