"""Open a local HTML file in headless Chromium, collect console errors and broken images, take a screenshot.

The DevTools protocol over ``--remote-debugging-pipe`` (JSON messages separated by NUL on file descriptors
3 and 4 of the browser), so no client library is needed. Console errors are ``Runtime.consoleAPICalled``
of type error / assert, ``Runtime.exceptionThrown`` and ``Log.entryAdded`` at level error (a file that
does not load, a blocked request). Broken images: ``<img>`` elements that did not decode.

    python tests/headless_chromium.py REPORT.html SCREENSHOT.png [--width 1280] [--max-height 4000]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("SDI_CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).is_file() else None
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    broken_images: int = -1
    n_images: int = 0
    title: str = ""
    screenshot: Path | None = None
    height: int = 0


class _Pipe:
    def __init__(self, proc: subprocess.Popen, wfd: int, rfd: int):
        self.proc, self.wfd, self.rfd, self.buf, self.next_id = proc, wfd, rfd, b"", 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60.0):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.wfd, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.time() + timeout
        for k, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(k)
        while True:
            m = self._read(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def drain(self, seconds: float) -> None:
        deadline = time.time() + seconds
        try:
            while True:
                self.events.append(self._read(deadline))
        except TimeoutError:
            pass

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.rfd, 1 << 20)
            if not chunk:
                self.proc.errlog.seek(0)
                err = self.proc.errlog.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()}): {err}")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)


def _high(*fds: int) -> tuple[int, ...]:
    """The fds moved to numbers >= 10, so that putting them on 3 and 4 in the child never overwrites one."""
    import fcntl

    out = []
    for fd in fds:
        out.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return tuple(out)


def check_page(
    html_path: Path | str, screenshot: Path | str, width: int = 1280, max_height: int = 4000, timeout: float = 90.0
) -> PageCheck:
    """Load ``html_path`` (file://) in headless Chromium; see the module docstring."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium found (apt-get install chromium, or set SDI_CHROMIUM)")
    html_path, screenshot = Path(html_path).resolve(), Path(screenshot)
    to_browser_r, to_browser_w = _high(*os.pipe())
    from_browser_r, from_browser_w = _high(*os.pipe())

    def _fds() -> None:  # the browser reads commands on fd 3 and writes answers on fd 4
        os.dup2(to_browser_r, 3)
        os.dup2(from_browser_w, 4)

    with tempfile.TemporaryDirectory(prefix="sdi-chromium-") as profile:
        args = [
            exe,
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        errlog = open(Path(profile) / "stderr.log", "w+b")  # a file: a chatty browser never blocks on a pipe
        proc = subprocess.Popen(args, preexec_fn=_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=errlog)
        proc.errlog = errlog
        os.close(to_browser_r)
        os.close(from_browser_w)
        pipe = _Pipe(proc, to_browser_w, from_browser_r)
        out = PageCheck()
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            sid = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.send(f"{domain}.enable", session=sid)
            pipe.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session=sid,
            )
            pipe.send("Page.navigate", {"url": html_path.as_uri()}, session=sid)
            pipe.wait_event("Page.loadEventFired", timeout=timeout)
            pipe.drain(0.5)
            ev = pipe.send(
                "Runtime.evaluate",
                {
                    "expression": "JSON.stringify({n: document.images.length, broken: Array.from(document.images)"
                    ".filter(i => !i.complete || i.naturalWidth === 0).length, title: document.title, "
                    "h: document.documentElement.scrollHeight})",
                    "returnByValue": True,
                },
                session=sid,
            )
            info = json.loads(ev["result"]["value"])
            out.n_images, out.broken_images, out.title, out.height = info["n"], info["broken"], info["title"], info["h"]
            height = min(int(info["h"]), max_height)
            pipe.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=sid,
            )
            pipe.drain(0.3)
            shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=sid, timeout=timeout)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            out.screenshot = screenshot
            pipe.drain(0.2)
        finally:
            try:
                pipe.send("Browser.close", timeout=10)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(to_browser_w)
            os.close(from_browser_r)
            errlog.close()
    for e in pipe.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.console_errors.append(
                "console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
            )
        elif m == "Runtime.exceptionThrown":
            out.console_errors.append("exception: " + str(p.get("exceptionDetails", {}).get("text")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            ent = p["entry"]
            out.console_errors.append(f"log ({ent.get('source')}): {ent.get('text')} {ent.get('url', '')}".rstrip())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("screenshot", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--max-height", type=int, default=4000)
    a = ap.parse_args(argv)
    r = check_page(a.html, a.screenshot, a.width, a.max_height)
    print(f"{a.html}: {r.n_images} images, {r.broken_images} broken, page height {r.height}px -> {r.screenshot}")
    for e in r.console_errors:
        print("  " + e)
    return 1 if r.console_errors or r.broken_images else 0


if __name__ == "__main__":
    sys.exit(main())
