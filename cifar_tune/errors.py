"""User-facing errors: the CLI prints them as one line each and exits 2, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (spec, files, arguments). ``lines`` are printed one per line."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


class SpecError(UserError):
    """One or more errors in a search spec, each naming its key path."""


class ErrorList:
    """Collects ``path: message`` errors so validation reports all of them at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        line = f"{path}: {message}" if path else message
        if line not in self.items:
            self.items.append(line)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise SpecError(*self.items)
