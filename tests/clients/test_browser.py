"""A real browser (headless Chromium) calling the gateway from another origin."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from ..live_gateway import free_port
from ..support import BROWSER_KEY, CANARIES, CHAT_KEY, DOCS_KEY

PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>gateway browser test</title>
<script>
window.events = [];
async function envelope(gateway, key) {
  const response = await fetch(gateway + "/proxy", {
    method: "POST",
    headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
    body: JSON.stringify({method: "POST", path: "/chat/completions", body: {model: "m"}}),
  });
  return {status: response.status, body: await response.json(),
          requestId: response.headers.get("x-request-id")};
}
async function stream(gateway, key) {
  const response = await fetch(gateway + "/proxy/files/sse-lockstep?events=4", {
    headers: {"Authorization": "Bearer " + key},
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      window.events.push(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
  return window.events;
}
async function attempt(gateway, key) {
  try {
    const response = await fetch(gateway + "/proxy", {
      method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({path: "/models"}),
    });
    return "not blocked: " + response.status;
  } catch (error) {
    return "blocked: " + error.name;
  }
}
</script>
<p>test page</p>
"""


class PageHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


def serve_page(port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), PageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def pages(page_origin):
    allowed = serve_page(urlsplit(page_origin).port)
    other = serve_page(free_port())
    yield page_origin, f"http://127.0.0.1:{other.server_address[1]}"
    allowed.shutdown()
    other.shutdown()


def test_browser_envelope_stream_and_blocked_origin(browser, pages, live_gateway, fake_upstream):
    allowed_origin, other_origin = pages
    page = browser.new_page()
    page.goto(allowed_origin + "/")

    result = page.evaluate("([g, k]) => envelope(g, k)", [live_gateway.url, BROWSER_KEY])
    assert result["status"] == 200
    assert result["body"]["choices"][0]["message"]["content"] == "Hello from the fake upstream"
    assert result["requestId"] == "req-openai"  # readable only through Expose-Headers

    # The upstream sends event i+1 only after the page has recorded event i.
    page.evaluate("([g, k]) => { window.done = stream(g, k); }", [live_gateway.url, BROWSER_KEY])
    for count in range(1, 5):
        page.wait_for_function(f"window.events.length >= {count}", timeout=10_000)
        fake_upstream.release.release()
    assert page.evaluate("window.done") == ["data: 0", "data: 1", "data: 2", "data: 3"]

    before = len(fake_upstream.seen)
    other = browser.new_page()
    other.goto(other_origin + "/")
    outcome = other.evaluate("([g, k]) => attempt(g, k)", [live_gateway.url, BROWSER_KEY])
    assert outcome == "blocked: TypeError"
    assert len(fake_upstream.seen) == before  # the preflight stopped it before any upstream call


def test_a_refusal_is_readable_by_a_page_some_client_allows(
    browser, pages, live_gateway, fake_upstream
):
    allowed_origin, _ = pages
    page = browser.new_page()
    page.goto(allowed_origin + "/")
    before = len(fake_upstream.seen)
    # CHAT_KEY's client does not allow this page; BROWSER_KEY's does. The page
    # reads the 403 and its code instead of a bare "Failed to fetch".
    outcome = page.evaluate(
        """async ([g, k]) => {
          const r = await fetch(g + "/proxy", {method: "POST",
            headers: {"Authorization": "Bearer " + k, "Content-Type": "application/json"},
            body: JSON.stringify({path: "/models"})});
          return {status: r.status, body: await r.json()};
        }""",
        [live_gateway.url, CHAT_KEY],
    )
    assert outcome["status"] == 403
    assert outcome["body"]["error"] == "origin_not_allowed"
    assert len(fake_upstream.seen) == before


def test_docs_try_it_out_calls_through_the_gateway(browser, live_gateway, fake_upstream):
    page = browser.new_page()
    page.goto(live_gateway.url + "/docs")
    page.click("button.authorize")
    page.fill(".modal-ux input[type=text]", DOCS_KEY)
    page.click(".modal-ux button.authorize")
    page.click(".modal-ux button.btn-done")
    page.click("#operations-default-proxyEnvelope .opblock-summary")
    page.click("#operations-default-proxyEnvelope .try-out__btn")
    page.click("#operations-default-proxyEnvelope .execute")
    status = page.wait_for_selector(
        "#operations-default-proxyEnvelope .live-responses-table tbody .response-col_status",
        timeout=10_000,
    )
    assert status.inner_text().strip().startswith("200"), status.inner_text()
    seen = fake_upstream.last("/v1/chat/completions")
    assert seen.headers["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]
    assert b"Say hello" in seen.body  # the example envelope, sent as it is shown
