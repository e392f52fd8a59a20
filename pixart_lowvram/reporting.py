"""How the library tells its front end what it is doing. The library never prints: it calls a Reporter, and
the CLI's reporter draws tqdm bars and messages. The default reporter stays silent."""
from __future__ import annotations


class Bar:
    """A progress bar the library advances; the default does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        """Say what is being worked on now (e.g. which image)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Reporter:
    def bar(self, desc: str, total: int | None, unit: str = "it", transient: bool = False) -> Bar:
        """A bar for `total` units of work; a transient one (loading) disappears when done."""
        return Bar()

    def info(self, message: str) -> None:
        pass
