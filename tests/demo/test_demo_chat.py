"""`make demo-check`: the chat page of the stack `make demo` left running, in headless Chromium.

Store questions typed into the page get streamed replies from the released fine-tune of SmolLM2-135M-Instruct,
each on the question's topic; /api/model names the base model and its licence; a screenshot of the conversation is
saved to bench/out/demo-chat.png. Not part of `make test` (it needs the demo's trained model, not a test stack).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, chromium

pytestmark = [pytest.mark.demo, pytest.mark.browser]
SHOT = REPO / "bench" / "out" / "demo-chat.png"
# A question a shop's customer asks, and words one of which an on-topic answer contains.
QUESTIONS = {
    "Where is my order?": ("order", "track", "shipping", "delivery"),
    "How do I return an item for a refund?": ("refund", "return"),
    "I want to cancel my order": ("cancel",),
}


@pytest.fixture(scope="module")
def chat_url() -> str:
    state = Path(REPO / ".ecb" / "stack.json")
    if not state.exists():
        pytest.fail(f"no demo stack ({state} is missing): run `make demo` first")
    url = f"http://127.0.0.1:{json.loads(state.read_text()).get('chat_port', 8000)}"
    try:
        served = requests.get(f"{url}/api/model", timeout=10).json()
    except requests.RequestException as exc:
        pytest.fail(f"the demo's chat service does not answer at {url} ({exc}): run `make demo` first")
    assert served["ready"] and served["version"], served
    return url


def test_demo_chat_answers_store_questions_on_topic(chat_url):
    served = requests.get(f"{chat_url}/api/model", timeout=10).json()
    assert "SmolLM2-135M-Instruct" in (served["base_model_source"] or ""), served
    assert served["base_model_license"] == "apache-2.0"
    replies = {}
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 1400})
        page.goto(chat_url)
        page.wait_for_selector("#welcome")
        for n, question in enumerate(QUESTIONS, 1):
            page.fill("#input", question)
            page.click("#send")
            # the n-th reply finished streaming: its rating buttons are shown (the page's CSP forbids a JS predicate)
            page.locator(".msg.assistant:not(.streaming) .rate").nth(n - 1).wait_for(timeout=120000)
            replies[question] = page.locator(".msg.assistant .text").nth(n - 1).text_content()
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOT), full_page=True)
    print(f"\nDEMO CHAT ({served['version']}): {SHOT}")
    for question, reply in replies.items():
        print(f"  Q: {question}\n  A: {reply}")
    off_topic = {q: r for q, r in replies.items() if not any(w in r.lower() for w in QUESTIONS[q])}
    assert not off_topic, off_topic
    assert SHOT.stat().st_size > 20000
