"""The local ends of ``rproxy tcp``: a TCP connection, or the process's stdin and stdout.

A channel reads its bytes from a ``Source`` and writes what the service sends to a ``Sink``.
Pipes and sockets are read and written on the event loop; a terminal or a regular file
cannot be polled, so one worker thread per direction does its blocking reads and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import stat
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ..const import TCP_READ_SIZE

__all__ = ["PipeSink", "Sink", "Source", "StreamSink", "StreamSource", "open_fd_sink", "open_fd_source"]


class Source(Protocol):
    """The local side's bytes towards the service."""

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" at end of input. OSError when the local side failed."""
        ...


class Sink(Protocol):
    """Where the service's bytes go."""

    async def write(self, data: bytes) -> None:
        """Write ``data``; return once the local side has room for more."""
        ...

    async def end(self) -> None:
        """No more bytes will come: half-close (a socket) or close (a pipe)."""
        ...

    def abort(self) -> None:
        """Drop the local side at once (a reset, for a socket)."""
        ...


class StreamSource:
    """A Source reading an asyncio StreamReader."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def read(self, size: int) -> bytes:
        return await self._reader.read(size)


class StreamSink:
    """A Sink writing to an asyncio StreamWriter; the end is ``write_eof`` where the transport can."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def end(self) -> None:
        if self._writer.can_write_eof():
            self._writer.write_eof()
        else:
            self._writer.close()

    def abort(self) -> None:
        self._writer.transport.abort()


class _PipeProtocol(asyncio.Protocol):
    """Flow control of a write pipe: ``drain`` waits while the transport's buffer is full."""

    def __init__(self) -> None:
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    async def drain(self) -> None:
        if self.lost.done():
            raise BrokenPipeError("the local reader closed its end")
        if self._paused:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            if self.lost.done():
                raise BrokenPipeError("the local reader closed its end")


class PipeSink:
    """A Sink writing to a pipe (ssh's end of a ProxyCommand): the end closes the pipe, after
    everything written has been handed to it, so the reader sees EOF with all the bytes."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: _PipeProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            raise BrokenPipeError("the local reader closed its end")
        self._transport.write(data)
        await self._protocol.drain()

    async def end(self) -> None:
        self._transport.close()  # flushes the buffer first
        await self._protocol.lost

    def abort(self) -> None:
        if not self._protocol.lost.done():  # asyncio's pipe transport fails when aborted after it closed
            self._transport.abort()


class _Worker:
    """A daemon thread making the blocking reads or writes of a descriptor no event loop can watch:
    a regular file, /dev/null, a terminal. Daemon, so a read waiting at a terminal never holds up exit."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            call, future = job
            try:
                outcome: tuple[Any, BaseException | None] = (call(), None)
            except Exception as err:
                outcome = (None, err)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                self._loop.call_soon_threadsafe(_settle, future, *outcome)

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        future = self._loop.create_future()
        self._jobs.put((functools.partial(function, *args), future))
        return await future

    def stop(self) -> None:
        self._jobs.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _ThreadSource:
    """A Source reading ``fd`` in a worker thread, one read at a time (no read-ahead)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._worker = _Worker("rproxy-tcp-read")

    async def read(self, size: int) -> bytes:
        data: bytes = await self._worker.call(os.read, self._fd, size)
        if not data:
            self._worker.stop()
        return data


class _ThreadSink:
    """A Sink writing ``fd`` in a worker thread; the end closes ``fd``."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._worker = _Worker("rproxy-tcp-write")

    async def write(self, data: bytes) -> None:
        if self._fd is None:
            raise BrokenPipeError("the output is closed")
        await self._worker.call(_write_all, self._fd, data)

    async def end(self) -> None:
        if self._fd is not None:
            await self._worker.call(os.close, self._fd)
            self._fd = None
        self._worker.stop()

    def abort(self) -> None:
        self._worker.stop()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pollable(fd: int) -> bool:
    """Pipes and sockets: what every event loop (asyncio's, uvloop) watches. A terminal or /dev/null
    is refused by epoll or crashes uvloop, and a regular file is never "not ready"."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def open_fd_source(fd: int) -> Source:
    """A Source over ``fd`` (a pipe, socket, terminal or file); it takes over the descriptor."""
    if not _pollable(fd):
        return _ThreadSource(fd)
    reader = asyncio.StreamReader(limit=TCP_READ_SIZE)
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader),
        open(fd, "rb", buffering=0),  # noqa: SIM115 (the transport owns it)
    )
    return StreamSource(reader)


async def open_fd_sink(fd: int) -> Sink:
    """A Sink over ``fd`` (a pipe, socket, terminal or file); it takes over the descriptor."""
    if not _pollable(fd):
        return _ThreadSink(fd)
    transport, protocol = await asyncio.get_running_loop().connect_write_pipe(
        _PipeProtocol,
        open(fd, "wb", buffering=0),  # noqa: SIM115 (the transport owns it)
    )
    return PipeSink(transport, protocol)
