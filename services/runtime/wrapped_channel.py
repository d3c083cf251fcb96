"""A grpc.aio channel that hands its stubs wrapped callables.

What chatmesh does around its own client calls (client metrics, passing the request id and trace
context on) wraps the stubs' callables rather than being a grpc.aio client interceptor: any client
interceptor moves a channel's calls onto grpc.aio's intercepted-call path, which costs about 40 µs of
CPU per message written on a client stream and 20-30 µs per unary call.
"""

from __future__ import annotations

from typing import Any

import grpc


class WrappedChannel(grpc.aio.Channel):
    """Delegates to `channel`; each stub callable it creates goes through `_wrap`."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def _wrap(self, callable_: Any, method: str, request_streaming: bool, response_streaming: bool) -> Any:
        raise NotImplementedError

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._channel.unary_unary(method, *args, **kwargs), method, False, False)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._channel.unary_stream(method, *args, **kwargs), method, False, True)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._channel.stream_unary(method, *args, **kwargs), method, True, False)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._channel.stream_stream(method, *args, **kwargs), method, True, True)

    async def __aenter__(self) -> WrappedChannel:
        await self._channel.__aenter__()
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self._channel.__aexit__(exc_type, exc_val, exc_tb)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()
