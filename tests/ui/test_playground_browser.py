"""The playground in a real browser (Playwright driving Debian's Chromium, headless) against the
real deltahub server on the toy models: pick a variant, stream a reply, switch variant and keep the
conversation, stop a reply, compare two variants side by side, see server errors.

Screenshots go to the test's tmp_path and to artifacts/ui/ (gitignored) for a person to look at.
Needs /usr/bin/chromium (`apt-get install -y chromium`); Playwright never downloads a browser here.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("playwright")
pytest.importorskip("gradio")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium: apt-get install -y chromium")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(server_url: str):
    from deltahub.playground import launch

    return launch(server_url, port=_free_port(), block=False, quiet=True)


@pytest.fixture(scope="module")
def playground(ui_server):
    demo = _launch(ui_server.url)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, playground):
    pg = browser.new_page(viewport={"width": 1280, "height": 1000})
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(playground)
    pg.wait_for_selector("#server-status:has-text('Connected')")
    yield pg
    pg.close()


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)


def _norm(s: str) -> str:
    return " ".join(s.split())


def _expected(url: str, variant: str, messages: list[dict], max_tokens: int) -> str:
    """The server's own non-streamed greedy answer, outside the UI."""
    body = {"model": variant, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def _sampling(page, *, temperature: str, max_tokens: str) -> None:
    acc = page.locator("#sampling")
    if not page.locator("#temperature").is_visible():
        acc.get_by_text("Sampling").first.click()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for sel, value in (("#temperature", temperature), ("#max-tokens", max_tokens)):
        box = page.locator(f"{sel} input[type=number]")
        # the slider's state holds the value once its range input shows it (what a send reads).
        # Under load (the whole suite on 2 cores) a fill right after the accordion opened was
        # sometimes lost, and the send went out with the old temperature: fill until it holds
        for _ in range(5):
            box.fill(value)
            box.press("Enter")
            try:
                page.wait_for_function(
                    "([s, v]) => Number(document.querySelector(s).value) === Number(v)",
                    arg=[f"{sel} input[type=range]", value],
                    timeout=4_000,
                )
                break
            except PlaywrightTimeout:
                continue
        else:
            raise AssertionError(f"{sel} did not take the value {value}")


def _pick(page, dropdown: str, name: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)} ·")).click()


def _wait_reply_done(page, variant: str) -> str:
    """The line under the chat once ``variant``'s reply finished (or failed)."""
    page.wait_for_function(
        """v => { const t = document.querySelector('#reply-stats').innerText;
                  return t.startsWith('⚠') || (t.startsWith(v + ' ·') && t.includes('tokens')
                                               && !t.includes('streaming')); }""", arg=variant)
    return page.locator("#reply-stats").inner_text()


def _bot_texts(page) -> list[str]:
    bots = page.locator("#chatbot [data-testid=bot]")
    return [bots.nth(i).inner_text() for i in range(bots.count())]


def _watch_streaming(page) -> None:
    """Record in ``window.__streaming`` each distinct reply line shown while a reply streams."""
    page.evaluate("""() => {
        window.__streaming = [];
        const el = document.querySelector('#reply-stats');
        new MutationObserver(() => {
            const t = el.innerText;
            if (t.includes('streaming') && !window.__streaming.includes(t)) window.__streaming.push(t);
        }).observe(el, {subtree: true, childList: true, characterData: true});
    }""")


def test_chat_streams_and_switching_variant_keeps_the_conversation(page, ui_server, tmp_path):
    a, b = ui_server.variants[:2]
    prompt = "hello world again"
    _sampling(page, temperature="0", max_tokens="24")
    _pick(page, "#variant", a)
    _shot(page, tmp_path, "01-picked")
    _watch_streaming(page)
    with ui_server.slow_steps(0.01):  # a pace at which a person sees the reply grow
        page.locator("#message textarea").fill(prompt)
        page.locator("#send").click()
        stats = _wait_reply_done(page, a)
    _shot(page, tmp_path, "02-first-reply")
    want_a = _expected(ui_server.url, a, [{"role": "user", "content": prompt}], 24)
    (bubble_a,) = _bot_texts(page)
    assert _norm(bubble_a).startswith(_norm(want_a)) and want_a.strip(), (bubble_a, want_a)
    assert stats.startswith(f"{a} · first token") and "tok/s" in stats and re.search(r"\d+ tokens", stats)
    assert a in bubble_a.split("\n")[-1]  # the note under the reply names the variant
    seen = page.evaluate("window.__streaming")
    assert len(seen) >= 2, f"the reply did not stream: {seen}"  # shown growing, token count rising

    _pick(page, "#variant", b)
    page.locator("#message textarea").fill(prompt)
    page.locator("#message textarea").press("Enter")
    _wait_reply_done(page, b)
    _shot(page, tmp_path, "03-switched-variant")
    history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": want_a},
               {"role": "user", "content": prompt}]
    want_b = _expected(ui_server.url, b, history, 24)
    bubbles = _bot_texts(page)
    assert len(bubbles) == 2 and _norm(bubbles[0]) == _norm(bubble_a)  # the conversation is kept
    assert _norm(bubbles[1]).startswith(_norm(want_b)) and want_b.strip()
    assert _norm(want_b) != _norm(want_a)
    assert b in bubbles[1].split("\n")[-1]
    assert page.locator("#chatbot [data-testid=user]").count() == 2


def test_stop_aborts_the_reply_on_the_server(page, ui_server, tmp_path):
    # The toy base was trained on prose only: greedy, it never ends a chat turn by itself, so
    # only Stop ends this reply before its 480 tokens.
    _sampling(page, temperature="0", max_tokens="480")
    _pick(page, "#variant", ui_server.base)
    before = ui_server.engine.stats()["base"]["generated_tokens"]
    with ui_server.slow_steps(0.01):  # >= 4.8 s for the whole reply: time to press Stop
        page.locator("#message textarea").fill("hello world again")
        page.locator("#send").click()
        page.wait_for_function("() => document.querySelector('#reply-stats').innerText.includes('streaming')")
        page.locator("#stop").click()
        page.wait_for_function("() => document.querySelector('#reply-stats').innerText.includes('stopped')")
        deadline = time.monotonic() + 10
        while ui_server.running() and time.monotonic() < deadline:
            time.sleep(0.05)
    _shot(page, tmp_path, "04-stopped")
    assert ui_server.running() == 0
    assert ui_server.engine.stats()["base"]["generated_tokens"] - before < 480  # aborted on the server
    (bubble,) = _bot_texts(page)
    assert "stopped" in bubble and int(re.search(r"(\d+) tokens", bubble).group(1)) < 480
    assert bubble.split("\n")[0].strip()  # the partial reply stays


def test_compare_streams_two_variants_side_by_side(page, ui_server, tmp_path):
    from playwright.sync_api import expect

    a, b = ui_server.variants[:2]
    prompt = "good morning friend"
    _sampling(page, temperature="0", max_tokens="24")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-variants").get_by_role("button", name="Clear").click()  # the default pair
    _pick(page, "#compare-variants", a)
    _pick(page, "#compare-variants", b)
    page.locator("#compare-prompt textarea").fill(prompt)
    page.locator("#compare-run").click()
    page.wait_for_selector("#compare-status:has-text('Done.')")
    _shot(page, tmp_path, "05-compare")
    assert page.locator("#compare-col-0").is_visible() and page.locator("#compare-col-1").is_visible()
    assert not page.locator("#compare-col-2").is_visible()
    replies = [page.locator(f"#compare-reply-{i} textarea").input_value() for i in range(2)]
    wants = [_expected(ui_server.url, v, [{"role": "user", "content": prompt}], 24) for v in (a, b)]
    assert replies == wants and replies[0] != replies[1] and all(r.strip() for r in replies)
    for i, v in enumerate((a, b)):
        expect(page.locator(f"#compare-head-{i}")).to_have_text(v)
        note = page.locator(f"#compare-note-{i}").inner_text()
        assert note.startswith(f"{v} · first token") and "tok/s" in note
    page.get_by_role("tab", name="Variants").click()
    table = page.locator("#variants-table")
    for v in (a, b):  # both just answered: resident now
        expect(table.get_by_role("row").filter(has_text=v)).to_contain_text("warm")
    expect(table.get_by_role("row").filter(has_text=ui_server.base)).to_contain_text("base")
    _shot(page, tmp_path, "05b-variants-table")


def test_server_errors_are_shown(page, ui_server, tmp_path, browser):
    _sampling(page, temperature="0", max_tokens="8")
    box = page.locator("#variant input")
    box.fill("no-such-variant")
    box.press("Enter")
    page.locator("#message textarea").fill("hi")
    page.locator("#send").click()
    stats = _wait_reply_done(page, "no-such-variant")
    _shot(page, tmp_path, "06-unknown-variant")
    assert "Unknown variant 'no-such-variant'" in stats and "HTTP 404" in stats
    assert "Unknown variant 'no-such-variant'" in _bot_texts(page)[-1]

    down = _launch(f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    try:
        pg = browser.new_page(viewport={"width": 1280, "height": 700})
        pg.goto(down.local_url)
        pg.wait_for_selector("#server-status:has-text('unreachable')", timeout=TIMEOUT_MS)
        _shot(pg, tmp_path, "07-server-down")
        assert "Server unreachable at http://127.0.0.1:" in pg.locator("#server-status").inner_text()
        pg.close()
    finally:
        down.close()


def test_mounted_inside_the_server(browser, ui_server, tmp_path):
    import gradio as gr
    from deltahub.server.api.app import create_app

    from deltahub.playground import build_app

    def make(url: str):
        app = create_app(ui_server.engine, model_id=ui_server.base)
        return gr.mount_gradio_app(app, build_app(url), path="/ui")

    url = ui_server.serve(make)
    assert {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]} >= set(ui_server.variants)
    pg = browser.new_page(viewport={"width": 1280, "height": 1000})
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(f"{url}/ui/")
    pg.wait_for_selector(f"#server-status:has-text('Connected to {url}')")
    _sampling(pg, temperature="0", max_tokens="16")
    _pick(pg, "#variant", ui_server.variants[1])
    pg.locator("#message textarea").fill("hello from inside")
    pg.locator("#send").click()
    stats = _wait_reply_done(pg, ui_server.variants[1])
    _shot(pg, tmp_path, "08-mounted-in-server")
    want = _expected(url, ui_server.variants[1], [{"role": "user", "content": "hello from inside"}], 16)
    (bubble,) = _bot_texts(pg)
    assert _norm(bubble).startswith(_norm(want)) and "tokens" in stats
    pg.close()
