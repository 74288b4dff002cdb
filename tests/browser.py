"""Drive Debian's headless Chromium for the report tests: load a file with no network, dump
the rendered DOM, the console log and a net log, or take a screenshot; parse the DOM.

Flags follow /work/shared/CIRCUITSVIS_NOTES.md: a fresh profile per run, no background
services, ``--virtual-time-budget`` so the dump waits for rendering. Every host name
resolves to nothing (``--host-resolver-rules``), so nothing can leave the machine; the net
log still records any request the page starts (its network isolation key is ``file://``),
which is how the tests prove there is none.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000"]
MISSING = ("Chromium is required for the report's browser tests and was not found at {where} (or $L3D_CHROMIUM). "
           "Install it: apt-get install -y --no-install-recommends chromium")


def find_chromium() -> Optional[str]:
    env = os.environ.get("L3D_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for path in CHROMIUM_CANDIDATES:
        if Path(path).is_file():
            return path
    found = shutil.which("chromium")
    return found


@dataclasses.dataclass
class Run:
    dom: str
    console: list[str]  # console messages and JavaScript errors Chromium logged
    page_requests: list[str]  # URLs of network requests the page itself started
    stderr: str


def _page_requests(netlog: Path) -> list[str]:
    """URLs of requests whose network isolation key is the local page (file://); Chromium's
    own background services use other keys."""
    if not netlog.is_file():
        raise RuntimeError("Chromium wrote no net log")
    text = netlog.read_text(encoding="utf-8", errors="replace").rstrip()
    if not text.endswith("}"):  # a log cut short at exit: close it
        text = text.rstrip(",\n") + "]}"
    data = json.loads(text)
    types = {v: k for k, v in data["constants"]["logEventTypes"].items()}
    urls = []
    for event in data.get("events", []):
        params = event.get("params") or {}
        if types.get(event["type"]) == "URL_REQUEST_START_JOB" and "file://" in str(params.get("network_isolation_key")):
            urls.append(params.get("url", "?"))
    return urls


def run(chromium: str, page: Path, *, timeout: float = 90) -> Run:
    """Load ``page`` (a local file) and return its rendered DOM, console and page requests."""
    with tempfile.TemporaryDirectory(prefix="l3d-chromium-") as tmp:
        netlog = Path(tmp) / "net.json"
        cmd = [chromium, *FLAGS, f"--user-data-dir={tmp}/profile", "--enable-logging=stderr", "--v=0",
               f"--log-net-log={netlog}", "--dump-dom", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise RuntimeError(f"chromium failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
        return Run(proc.stdout, console, _page_requests(netlog), proc.stderr)


def screenshot(chromium: str, page: Path, out: Path, *, width: int = 1200, height: int = 1600,
               timeout: float = 90) -> Path:
    with tempfile.TemporaryDirectory(prefix="l3d-chromium-") as tmp:
        cmd = [chromium, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
               f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"chromium screenshot failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return out


# --- a small DOM ------------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclasses.dataclass
class Node:
    tag: str
    attrs: dict
    children: list = dataclasses.field(default_factory=list)
    parent: Optional["Node"] = None

    def elements(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.elements()

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else ("" if c.tag in ("script", "style") else c.text())
                       for c in self.children)


class _Builder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), parent=self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, dict(attrs), parent=self.cur))

    def handle_endtag(self, tag):
        node = self.cur
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse(html: str) -> Node:
    b = _Builder()
    b.feed(html)
    b.close()
    return b.root


def mount_points(root: Node, pattern: str = r"l3d-([0-9a-f]+-)?cv-\d+") -> list[Node]:
    return [n for n in root.elements() if n.tag == "div" and re.fullmatch(pattern, n.attrs.get("id") or "")]
