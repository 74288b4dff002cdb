"""Screenshot an l3d_lens HTML report with headless Chromium (offline), e.g. for the README:

    l3d-lens demo --out l3d_demo_out
    python scripts/report_screenshot.py l3d_demo_out/report.html docs/report.png --height 3000 --scale 0.6

Needs Debian's chromium (apt-get install -y --no-install-recommends chromium) or $L3D_CHROMIUM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=1100)
    p.add_argument("--height", type=int, default=1500)
    p.add_argument("--scale", type=float, default=1.0, help="device scale factor (0.5 halves the image)")
    p.add_argument("--timeout", type=float, default=300, help="seconds chromium may take (a busy machine is slow)")
    args = p.parse_args(argv)
    chromium = os.environ.get("L3D_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        print("chromium not found: apt-get install -y --no-install-recommends chromium", file=sys.stderr)
        return 2
    url = args.report.resolve().as_uri()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:  # chromium may leave files
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp}",
               "--virtual-time-budget=5000", f"--window-size={args.width},{args.height}",
               f"--force-device-scale-factor={args.scale}", f"--screenshot={args.out.resolve()}", url]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"chromium took over {args.timeout:g} s (try a larger --timeout)", file=sys.stderr)
            return 1
    if res.returncode != 0 or not args.out.is_file():
        print(f"chromium failed: {res.stderr[-1000:]}", file=sys.stderr)
        return 1
    print(f"{args.out} ({args.out.stat().st_size // 1000} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
