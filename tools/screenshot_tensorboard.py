#!/usr/bin/env python
"""What a user sees on opening TensorBoard on a run: a PNG made with a headless Chromium.

    python tools/screenshot_tensorboard.py --logdir RUN_DIR --out view.png
        [--size 1920x1080] [--pin TAG ...] [--overwrite]

Starts TensorBoard on ``--logdir`` on a free local port, waits until it lists the runs, and
renders the page an RL run links to: Time Series, the tab TensorBoard opens on, with the
learning curves' cards pinned first and smoothing off. ``--pin`` names the cards (default: a
DVPO run's, ``megatron_dvpo.rl.dashboard``); those the runs did not log are left out. Charts
are drawn as SVG (TensorBoard's ``forceSVG``): headless Chromium draws no WebGL lines. The
page is read back too: the tool names each drawn card whose line leaves its chart (a point
scaled away as an outlier), and exits 1 if any does. Needs ``chromium`` (or
``chromium-browser``, ``google-chrome``) on the PATH (Debian: ``apt-get install chromium``);
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_dvpo.distributed import free_port  # noqa: E402
from megatron_dvpo.logging import Dashboard  # noqa: E402
from megatron_dvpo.rl.dashboard import rl_dashboard  # noqa: E402
from megatron_dvpo.rl.scorers import GVMScorer  # noqa: E402

DVPO_PINS = rl_dashboard(GVMScorer.final_value_tag, true_reward=True).pinned

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for_runs(url: str, server: subprocess.Popen, timeout: float = 90.0) -> list[str]:
    """The runs TensorBoard lists, once it lists any."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: TensorBoard exited with {server.returncode}")
        try:
            runs = get_json(f"{url}/data/runs")
            if runs:
                return runs
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"error: TensorBoard at {url} listed no run within {timeout:.0f}s")


@contextlib.contextmanager
def serve(logdir: Path):
    """TensorBoard on ``logdir`` at a free local port, from this environment (so with this
    package's plugin); yields its URL, port and runs once it lists any."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield url, port, wait_for_runs(url, server)
    finally:
        server.terminate()
        server.wait(timeout=30)


def drawn_cards(page: str) -> list[tuple[str, float, float, float]]:
    """Each drawn card's tag, its lines' lowest and highest pixel row beside the chart's
    height, from the page's SVG (rows run down from 0: a line inside its chart stays within
    [0, height])."""
    cards = []
    for card in page.split("<scalar-card-component")[1:]:
        tag = re.search(r'class="tag"[^>]*title="([^"]+)"', card)
        height = re.search(r'<line [^>]*y1="0"[^>]*y2="([\d.]+)"', card)
        rows = [float(row) for path in re.findall(r'<path d="M([^"]+)" style="fill: none', card)
                for row in re.findall(r",(-?[\d.e+-]+)", path)]
        if tag and height and rows:
            cards.append((tag.group(1), min(rows), max(rows), float(height.group(1))))
    return cards


def screenshot(logdir: Path, out: Path, size: str, browser: str,
               pins: tuple[str, ...]) -> tuple[list[str], list[str], list]:
    """Render TensorBoard's Time Series of ``logdir``, the logged ``pins`` first, into
    ``out``; returns the runs, the cards pinned and the drawn cards (``drawn_cards``)."""
    with serve(logdir) as (url, port, runs):
        logged = {tag for tags in get_json(f"{url}/data/plugin/scalars/tags").values()
                  for tag in tags}
        pinned = [tag for tag in pins if tag in logged]
        link = Dashboard(tuple(pinned)).link("127.0.0.1", port, forceSVG="true")
        width, height = size.split("x")
        # root may not sandbox; the virtual time budget lets the charts load and draw; a fresh
        # profile: no setting of an earlier visit
        flags = ["--no-sandbox"] if os.geteuid() == 0 else []
        with tempfile.TemporaryDirectory() as profile:
            done = subprocess.run([browser, "--headless", "--disable-gpu", "--hide-scrollbars",
                                   *flags, f"--user-data-dir={profile}",
                                   f"--window-size={width},{height}",
                                   "--virtual-time-budget=20000", f"--screenshot={out}",
                                   "--dump-dom", link], capture_output=True, text=True,
                                  timeout=180)
        if done.returncode or not out.is_file():
            raise SystemExit(f"error: {browser} made no screenshot (exit {done.returncode}): "
                             f"{done.stderr.strip().splitlines()[-1:]}")
        return runs, pinned, drawn_cards(done.stdout)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", default="1920x1080", help="the browser window, WIDTHxHEIGHT")
    parser.add_argument("--pin", nargs="+", default=DVPO_PINS, metavar="TAG",
                        help="the cards pinned first (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if not args.logdir.is_dir():
        parser.error(f"--logdir {args.logdir}: no such directory")
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    width, _, height = args.size.partition("x")
    if not (width.isdigit() and height.isdigit()):
        parser.error(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 1920x1080")
    browser = find_browser()
    if browser is None:
        parser.error(f"no headless browser: none of {', '.join(BROWSERS)} is on the PATH "
                     "(Debian: apt-get install chromium)")
    runs, pinned, cards = screenshot(args.logdir, args.out, args.size, browser,
                                     tuple(args.pin))
    print(f"wrote {args.out}: TensorBoard's Time Series of {len(runs)} run(s) "
          f"({', '.join(runs)}), pinned: {', '.join(pinned) or 'none'}")
    cut = [f"{tag} (rows {low:.0f} to {high:.0f} of 0 to {rows:.0f})"
           for tag, low, high, rows in cards if low < -0.5 or high > rows + 0.5]
    print(f"{len(cards)} cards drawn, {len(cut)} with a line leaving its chart"
          + "".join(f"\n  {card}" for card in cut))
    if cut or not cards:
        sys.exit(1)


if __name__ == "__main__":
    main()
