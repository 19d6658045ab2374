"""The built documentation site: every public name has its anchor in the built API reference, the command-line
page lists every option of every subcommand (generated from the parser), and in a real browser (Debian's
Chromium, headless) the front page renders and the search finds a public name's reference entry.

Slow: builds the site into a temporary folder (the notebook is not executed here: ``bash .ci/docs`` executes
it). ``DOCS_SCREENSHOT=PATH`` also writes the front page's screenshot to PATH (as docs/screenshot.png is
made)."""

from __future__ import annotations

import argparse
import html
import http.server
import inspect
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
from _ext import public_api  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SEARCHES = [  # (query, the reference entry the first results must link to)
    ("Weighted", "api/targets.html#backprop_hooks.targets.Weighted"),
    ("explain_text", "api/backprop_hooks.html#backprop_hooks.explain_text"),
    ("explain_generation", "api/backprop_hooks.html#backprop_hooks.explain_generation"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for tool in ("sphinx", "furo", "myst_nb", "sphinxarg"):
        pytest.importorskip(tool, reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-E", "-W", "--keep-going", "-n", "-q"]
    command += ["-D", "nb_execution_mode=off", "-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
    build = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert build.returncode == 0, build.stderr[-4000:]
    return out / "html"


@pytest.fixture(scope="module")
def url(site):
    """The site served on the loopback interface (a browser runs a site's search from http, as users read it)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    """Skip (before the site is built) where there is no Chromium."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium): the site is not opened in a browser")


def chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"  # a fresh profile per run
    run = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def text_of(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_every_public_name_has_its_anchor_in_the_built_reference(site):
    ids = {m for page in (site / "api").glob("*.html") for m in re.findall(r'id="([^"]+)"', page.read_text())}
    missing = []
    for module, name, value in public_api.public_names():
        entries = public_api.entries(module, name, value)
        anchors = {f"module-{e}" for e in entries} if inspect.ismodule(value) else set(entries)
        if not anchors & ids:
            missing.append(f"{module}.{name}")
    assert not missing, missing


def test_the_command_line_page_lists_every_option_of_every_subcommand(site):
    from backprop_hooks.cli import build_parser
    from backprop_hooks.eval import conservation, deletion

    page = text_of((site / "cli.html").read_text())
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    modules = [("deletion", deletion.parser()), ("conservation", conservation.parser())]
    parsers = list(commands.choices.items()) + modules
    for name, parser in parsers:
        assert name in page
        for action in parser._actions:
            for option in action.option_strings:
                assert option in page, (name, option)


def test_the_front_page_in_a_browser(browser, url, tmp_path):
    from PIL import Image

    shot = tmp_path / "front.png"
    chromium(tmp_path, "--window-size=1280,900", "--hide-scrollbars", f"--screenshot={shot}", f"{url}/index.html")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 900)
    assert len(image.getcolors(1 << 24)) > 1000  # the page drew its text, navigation and the cat's picture
    dom = chromium(tmp_path, "--dump-dom", f"{url}/index.html")
    assert "Getting started" in dom and "API reference" in dom and "chelsea_gradcam" in dom
    if os.environ.get("DOCS_SCREENSHOT"):  # the committed picture: a small palette PNG
        image.quantize(64, dither=Image.Dither.NONE).save(os.environ["DOCS_SCREENSHOT"], optimize=True)


@pytest.mark.parametrize("query, entry", SEARCHES)
def test_the_search_finds_the_reference_entry(browser, url, tmp_path, query, entry):
    """The search page runs its script in the browser; the results link to the name's entry, which is there."""
    dom = chromium(tmp_path, "--virtual-time-budget=20000", "--dump-dom", f"{url}/search.html?q={query}")
    links = re.findall(r'<ul[^>]*class="search"[^>]*>(.*?)</ul>', dom, re.S)
    assert links, "no search results were rendered"
    hrefs = [html.unescape(h) for h in re.findall(r'href="([^"]+)"', links[0])]
    assert entry in [re.sub(r"\?highlight=[^#]*", "", h) for h in hrefs[:5]], hrefs[:5]
    page, anchor = entry.split("#")
    assert f'id="{anchor}"' in chromium(tmp_path, "--dump-dom", f"{url}/{page}")


def test_a_search_for_nothing_finds_nothing(browser, url, tmp_path):
    dom = chromium(tmp_path, "--virtual-time-budget=20000", "--dump-dom", f"{url}/search.html?q=zzqxjv")
    assert "backprop_hooks.targets.Weighted" not in dom
