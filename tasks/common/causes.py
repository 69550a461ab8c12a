"""The one walk along an exception's causes: libraries wrap transport errors (MLflow raises its own error
without ``from``, Prefect re-raises inside its engine), so the error that says what happened is found by
following ``__cause__`` and, where no cause was set, ``__context__``."""

from __future__ import annotations

from collections.abc import Iterator


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, then each error it was raised from or during, once each (chains can loop)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
