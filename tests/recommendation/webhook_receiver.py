"""A real HTTP receiver on loopback for the webhook tests and bench: an
aiohttp server on port 0 that records every request (headers and body bytes)
and answers from a script (status, headers, or no answer until released)."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # Never answer (until the receiver closes): the sender's timeout is what ends it.
    hang: bool = False


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.replies: deque[Reply] = deque()
        self.default = Reply(200)
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def answer(self, *replies: Reply) -> None:
        """The next requests get these replies, in order; then `default`."""
        self.replies.extend(replies)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(
            Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        )
        reply = self.replies.popleft() if self.replies else self.default
        if reply.hang:
            await self._release.wait()
        return web.Response(status=reply.status, headers=reply.headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def url(self, path: str = "/hooks") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def release(self) -> None:
        """Answers the hanging requests now, and later ones at once."""
        self._release.set()

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


async def _serve_forever() -> None:
    receiver = Receiver()
    await receiver.start()
    print(receiver.port, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await receiver.close()


if __name__ == "__main__":
    # `python -m tests.recommendation.webhook_receiver`: a receiver in its own
    # process answering 200 to everything (the bench); prints its port.
    # (its record of requests grows without bound: for bench runs only)
    asyncio.run(_serve_forever())
