"""The Faust agent class of the app (Faust's `Agent` setting): an agent's crash goes through
the error policy (resonance_task.errors) first, then through Faust's own handling."""

from __future__ import annotations

from typing import Any

import faust

from resonance_task.errors import on_agent_error


def _through_policy(then: Any) -> Any:
    if getattr(then, "through_policy", False):
        return then  # a clone of an agent (Faust re-creates agents from their settings)

    async def on_error(agent: Any, exc: BaseException) -> None:
        await on_agent_error(agent, exc)
        if then is not None:
            await then(agent, exc)

    on_error.through_policy = True  # type: ignore[attr-defined]
    return on_error


class Agent(faust.Agent):
    def __init__(self, fun: Any, *, on_error: Any = None, **kwargs: Any) -> None:
        super().__init__(fun, on_error=_through_policy(on_error), **kwargs)
