"""Debian's Chromium, headless, driven over the DevTools protocol with nothing but ``websockets``.

``chromium(network, profile)`` starts the browser inside a visitor network namespace (see
``netns``) with a fresh profile directory and yields a ``Browser``; ``Browser.page()`` opens a
page in a browser context of its own (its own cache, cookies and storage: a cold start), whose
network traffic is recorded (``Page.requests``). The frontend of Home Assistant is a tree of web
components: ``deep(selector)`` in page scripts finds elements through every shadow root.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from .netns import VisitorNetwork

#: What works here (Debian 12's chromium, as root, in a container without a GPU): no sandbox,
#: no GPU, no QUIC, and nothing that phones home or updates itself during a test.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
)

#: Defines, for page scripts, ``deep(selector, root)`` (every match, through shadow roots),
#: ``deepText(element)`` (the text a user sees, slotted and shadow text included) and
#: ``byText(selector, text)`` (the first match whose text contains ``text``, or null).
DEEP_QUERY = """
const deep = (selector, root = document) => {
  const found = [];
  const walk = (node) => {
    found.push(...node.querySelectorAll(selector));
    for (const element of node.querySelectorAll("*")) {
      if (element.shadowRoot) walk(element.shadowRoot);
    }
  };
  walk(root);
  return found;
};
const deepText = (element) => {
  const parts = [];
  const walk = (node) => {
    if (node.nodeType === Node.TEXT_NODE) parts.push(node.textContent);
    if (node.nodeName === "STYLE" || node.nodeName === "SCRIPT") return;
    if (node.shadowRoot) walk(node.shadowRoot);
    const children = node.assignedNodes ? node.assignedNodes() : [];
    for (const child of children.length ? children : node.childNodes) walk(child);
  };
  walk(element);
  return parts.join(" ").replace(/\\s+/g, " ").trim();
};
const byText = (selector, text) => deep(selector).find((element) => deepText(element).includes(text)) || null;
"""


class BrowserError(AssertionError):
    """The browser answered a command with an error, or a page script threw."""


@dataclass
class Request:
    """One request a page made, as the DevTools protocol reported it."""

    url: str
    method: str
    resource_type: str
    #: The document that made it (a navigation abandons the requests of the one before).
    loader: str = ""
    status: int | None = None
    #: Body bytes received (decoded), summed from the dataReceived events.
    body_bytes: int = 0
    #: Bytes on the wire, headers included (loadingFinished), or None until it finished.
    wire_bytes: int | None = None
    failed: str | None = None
    started: float = 0.0
    finished: float | None = None
    from_cache: bool = False


class Connection:
    """A DevTools connection: commands with ids, events to listeners, sessions flattened."""

    def __init__(self, websocket: ClientConnection) -> None:
        self._websocket = websocket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[str, dict[str, Any], str | None], None]] = []
        self._reader = asyncio.create_task(self._read(), name="devtools reader")

    async def _read(self) -> None:
        try:
            async for raw in self._websocket:
                message = json.loads(raw)
                if "id" in message:
                    future = self._waiting.pop(message["id"], None)
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                for listener in list(self._listeners):
                    listener(message["method"], message.get("params", {}), message.get("sessionId"))
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(BrowserError("the browser closed the DevTools connection"))

    def listen(self, listener: Callable[[str, dict[str, Any], str | None], None]) -> None:
        self._listeners.append(listener)

    async def send(self, method: str, session: str | None = None, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """Send a command and return its result."""
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self._websocket.send(json.dumps(message))
        try:
            async with asyncio.timeout(timeout):
                answer = await future
        except TimeoutError:
            raise BrowserError(f"{method}: no answer from the browser in {timeout} s") from None
        finally:
            self._waiting.pop(command_id, None)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error'].get('message')}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def close(self) -> None:
        await self._websocket.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


@dataclass
class Page:
    """A page (tab) in a browser context of its own."""

    connection: Connection
    session: str
    target: str
    context: str
    requests: dict[str, Request] = field(default_factory=dict)
    console_errors: list[str] = field(default_factory=list)
    #: The main frame's current document.
    loader: str = ""

    def abandoned(self, request: Request) -> bool:
        """Whether ``request`` belonged to a document the page has left, unfinished or aborted
        (Chromium may not report the end of requests it drops when it leaves a page)."""
        left = request.loader != self.loader
        return left and (request.finished is None or request.failed == "net::ERR_ABORTED")

    async def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        return await self.connection.send(method, self.session, timeout, **params)

    def on_event(self, method: str, params: dict[str, Any], session: str | None) -> None:
        if session != self.session:
            return
        now = time.monotonic()
        if method == "Network.requestWillBeSent":
            request = params["request"]
            self.requests[params["requestId"]] = Request(
                url=request["url"],
                method=request["method"],
                resource_type=params.get("type", ""),
                loader=params.get("loaderId", ""),
                started=now,
            )
        elif (request := self.requests.get(params.get("requestId", ""))) is not None:
            if method == "Network.responseReceived":
                response = params["response"]
                request.status = response["status"]
                request.from_cache = bool(response.get("fromDiskCache") or response.get("fromServiceWorker"))
            elif method == "Network.dataReceived":
                request.body_bytes += params["dataLength"]
            elif method == "Network.loadingFinished":
                request.wire_bytes = int(params["encodedDataLength"])
                request.finished = now
            elif method == "Network.loadingFailed":
                request.failed = params["errorText"]
                request.finished = now
            elif method == "Network.requestServedFromCache":
                request.from_cache = True
        if method == "Page.frameNavigated" and "parentId" not in params["frame"]:
            self.loader = params["frame"]["loaderId"]
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            exception = details.get("exception", {})
            preview = exception.get("preview", {}).get("properties")
            shown = (
                json.dumps({p["name"]: p.get("value") for p in preview}) if preview else exception.get("description")
            )
            self.console_errors.append(
                f"{details.get('text')}: {shown} ({details.get('url', '')}:{details.get('lineNumber')})"
            )

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")

    async def evaluate(self, script: str, timeout: float = 30) -> Any:
        """The value of a page script (an expression, or a function body with ``return``), awaited."""
        source = f"(async () => {{ {DEEP_QUERY}\n{script if 'return' in script else 'return ' + script} }})()"
        result = await self.send(
            "Runtime.evaluate", timeout, expression=source, returnByValue=True, awaitPromise=True, userGesture=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"page script failed: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    async def wait_for(self, what: str, script: str, timeout: float) -> Any:
        """Poll a page script until its value is truthy; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = await self.evaluate(script)
            except BrowserError as err:  # the page is between documents, say
                last = err
            if last and not isinstance(last, BrowserError):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
            await asyncio.sleep(0.1)

    async def wait_for_network_idle(self, quiet: float, timeout: float) -> None:
        """Wait until no request has been under way for ``quiet`` seconds (at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [r for r in self.requests.values() if r.finished is None and not self.abandoned(r)]
            last = max((r.finished or 0.0 for r in self.requests.values()), default=0.0)
            if not pending and time.monotonic() - last >= quiet:
                return
            await asyncio.sleep(0.1)
        pending = [r.url for r in self.requests.values() if r.finished is None and not self.abandoned(r)]
        raise AssertionError(f"requests still under way after {timeout} s: {pending[:10]}")

    async def click(self, what: str, script: str, timeout: float = 15) -> None:
        """Click, with the mouse, the middle of the element a page script returns."""
        box = await self.wait_for(
            what,
            f"""const element = (() => {{ {script} }})();
            if (!element) return null;
            element.scrollIntoView({{block: "center"}});
            const box = element.getBoundingClientRect();
            return box.width && box.height ? {{x: box.x + box.width / 2, y: box.y + box.height / 2}} : null;""",
            timeout,
        )
        for event in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=event, x=box["x"], y=box["y"], button="left", clickCount=1)

    async def click_until(
        self, what: str, script: str, outcome: str, outcome_script: str, timeout: float = 30, tries: int = 3
    ) -> Any:
        """Click as :meth:`click` does until ``outcome_script`` holds, clicking again if it does not soon.

        A page that is still settling (translations arriving, a panel's layout changing) can move
        the element between locating it and the click, which then lands elsewhere: a person
        would click again, and so does this, at most ``tries`` times within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        for attempt in range(1, tries + 1):
            await self.click(what, script, max(1.0, deadline - time.monotonic()))
            wait = (deadline - time.monotonic()) / (tries - attempt + 1)
            try:
                return await self.wait_for(outcome, outcome_script, max(1.0, wait))
            except AssertionError:
                if attempt == tries:
                    raise
        raise AssertionError("unreachable")

    async def type_text(self, text: str) -> None:
        await self.send("Input.insertText", text=text)

    async def press_enter(self) -> None:
        for event in ("keyDown", "keyUp"):
            await self.send(
                "Input.dispatchKeyEvent",
                type=event,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
                text="\r" if event == "keyDown" else "",
            )

    async def set_viewport(self, width: int, height: int) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=width < 600
        )

    async def screenshot(self, path: Path) -> None:
        result = await self.send("Page.captureScreenshot", 60, format="png")
        path.write_bytes(base64.b64decode(result["data"]))


class Browser:
    """A running Chromium and its DevTools connection."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.pages: list[Page] = []
        connection.listen(self._dispatch)

    def _dispatch(self, method: str, params: dict[str, Any], session: str | None) -> None:
        for page in self.pages:
            page.on_event(method, params, session)

    async def page(self, width: int = 1280, height: int = 900) -> Page:
        """A blank page in a new browser context (nothing cached, no cookies, no storage)."""
        context = (await self.connection.send("Target.createBrowserContext"))["browserContextId"]
        target = (await self.connection.send("Target.createTarget", url="about:blank", browserContextId=context))[
            "targetId"
        ]
        session = (await self.connection.send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        page = Page(self.connection, session, target, context)
        self.pages.append(page)
        for domain in ("Page", "Runtime", "Network"):
            await page.send(f"{domain}.enable")
        await page.set_viewport(width, height)
        return page

    async def close_page(self, page: Page) -> None:
        await self.connection.send("Target.closeTarget", targetId=page.target)
        await self.connection.send("Target.disposeBrowserContext", browserContextId=page.context)
        self.pages.remove(page)


def chromium_path() -> str:
    """Debian's Chromium (``scripts/test ha`` installs the package)."""
    path = shutil.which("chromium")
    if path is None:
        raise AssertionError("chromium is not installed (apt-get install chromium; scripts/test ha does it)")
    return path


@asynccontextmanager
async def chromium(network: VisitorNetwork, profile: Path, log: Path, *flags: str) -> AsyncIterator[Browser]:
    """Chromium inside ``network``'s namespace with the fresh profile directory ``profile``
    (and ``flags`` besides CHROMIUM_FLAGS); its output goes to ``log``."""
    profile.mkdir(parents=True)
    with log.open("wb") as output:
        process = subprocess.Popen(
            network.command(chromium_path(), *CHROMIUM_FLAGS, *flags, f"--user-data-dir={profile}", "about:blank"),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    connection: Connection | None = None
    try:
        # Chromium writes its DevTools port into the profile once it listens (on the
        # namespace's loopback, which only a socket made inside the namespace reaches).
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            if process.poll() is not None:
                raise AssertionError(
                    f"chromium exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"chromium did not open its DevTools port in 30 s:\n{log.read_text(errors='replace')[-3000:]}"
                )
            await asyncio.sleep(0.1)
        port, path = active.read_text().splitlines()[:2]
        sock = await asyncio.to_thread(network.connect, "127.0.0.1", int(port))
        websocket = await connect(f"ws://127.0.0.1:{port}{path}", sock=sock, max_size=None, ping_interval=None)
        connection = Connection(websocket)
        yield Browser(connection)
    finally:
        if connection is not None:
            await connection.close()
        # The whole process group: the browser and its renderer, GPU and zygote processes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10)
