"""The chat page in headless Debian Chromium (Playwright with executable_path; no browser is downloaded).

The app runs on a real HTTP server (werkzeug, threaded) on a free loopback port with the tiny test model.
"""

from __future__ import annotations

import threading

import pytest

from tasks.config import load_config
from tasks.devstack import stack
from tests.conftest import chromium

pytestmark = [pytest.mark.integration, pytest.mark.browser]


@pytest.fixture(scope="module")
def live_url(services, tiny_base_model):
    from werkzeug.serving import make_server

    from tasks.chat import create_app

    cfg = load_config(overrides={"chat.model_uri": str(tiny_base_model), "chat.max_new_tokens": 32})
    server = make_server("127.0.0.1", stack.free_port(), create_app(cfg, wait_for_model=True), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def test_send_stream_and_history_survives_a_reload(browser, live_url, tiny_base_model):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(live_url)
    page.wait_for_function("document.getElementById('model').textContent.includes('local:')")
    assert tiny_base_model.name in page.text_content("#model")
    # Record every text the assistant bubble shows: streamed text grows token by token before the reply is done.
    page.evaluate("""() => {
        window.__texts = [];
        new MutationObserver((records) => {
            for (const r of records) {
                const box = r.target.closest ? r.target.closest('.msg.assistant') : null;
                if (!box) continue;
                for (const n of r.addedNodes) if (n.nodeType === Node.TEXT_NODE) window.__texts.push(n.data);
            }
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#input", "Where is my order?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant:not(.streaming) .rate button", timeout=60000)
    streamed = list(dict.fromkeys(t for t in page.evaluate("window.__texts") if t))
    assert len(streamed) >= 2, streamed  # the text grew in pieces (token events), not in one go at the end
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:], strict=False)), streamed
    reply = page.text_content(".msg.assistant .text")
    assert reply.strip()
    page.reload()
    page.wait_for_selector(".msg.assistant .text")
    texts = page.locator(".msg .text").all_text_contents()
    assert texts == ["Where is my order?", reply]  # history from Postgres, in order
    page.click(".msg.assistant .rate button[data-rating='1']")
    page.wait_for_selector(".rate button.on")
    assert errors == []


def test_markup_in_a_message_is_shown_as_text(browser, live_url):
    page = browser.new_page()
    page.goto(live_url)
    page.click("#new")
    payload = "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script>"
    page.fill("#input", payload)
    page.click("#send")
    page.wait_for_selector(".msg.assistant:not(.streaming) .rate button", timeout=30000)
    assert page.text_content(".msg.user .text") == payload
    assert page.locator(".msg.user img").count() == 0 and page.locator(".msg script").count() == 0
    assert page.evaluate("window.__xss") is None


def test_a_message_sent_right_after_new_conversation_stays(browser, live_url):
    """Typed and sent while "New conversation" is still being created (each creation answered 400 ms late here):
    the message goes to the new conversation and its reply stays on the page. Before, the send started a third
    conversation and the pending switch then wiped both bubbles (seen once in CI)."""
    page = browser.new_page()
    page.add_init_script("""(() => {
        const real = window.fetch;
        window.__created = 0;
        window.fetch = (path, options) => {
            const slow = path === "/api/conversations" && options && options.method === "POST";
            if (!slow) return real(path, options);
            window.__created += 1;
            return new Promise((ok) => setTimeout(ok, 400)).then(() => real(path, options));
        };
    })()""")
    page.goto(live_url)
    page.click("#new")
    page.fill("#input", "Can I change my delivery address?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant:not(.streaming) .rate button", timeout=30000)
    assert page.locator(".msg .text").all_text_contents()[0] == "Can I change my delivery address?"
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1
    assert page.evaluate("window.__created") == 2  # the first load's and the button's: none for the send
    page.reload()  # the stored conversation is the new one, with the exchange in it
    page.wait_for_selector(".msg.assistant .text")
    assert page.locator(".msg .text").all_text_contents()[0] == "Can I change my delivery address?"


def test_an_empty_conversation_greets_with_example_questions(browser, live_url):
    """A new conversation opens with the configured greeting and example questions, not a blank page; a click on a
    question sends it, and the greeting gives way to the conversation (it is page text: never a stored message)."""
    chat = load_config().chat
    page = browser.new_page()
    page.goto(live_url)
    page.click("#new")
    page.wait_for_selector("#welcome:not([hidden])")
    assert page.text_content("#welcome .greeting").strip() == chat.greeting
    assert [t.strip() for t in page.locator("#welcome .example").all_text_contents()] == chat.example_questions
    page.locator("#welcome .example").nth(1).click()
    page.wait_for_selector(".msg.assistant:not(.streaming) .rate button", timeout=60000)
    assert page.locator(".msg .text").all_text_contents()[0] == chat.example_questions[1]
    assert page.locator("#welcome").is_hidden() and page.text_content(".msg.assistant .text").strip()
    page.reload()  # the history has the question and the reply only
    page.wait_for_selector(".msg.assistant .text")
    assert page.locator(".msg").count() == 2 and page.locator("#welcome").is_hidden()
