"""A real browser: a page asks its app's server for a session token and streams a completion."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from ..live_gateway import free_port
from .test_live import _start, _stop_and_check_logs, live_session_config
from .test_tokens import WEB_KEY

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>chat</title>
<script>
async function chat(gateway) {
  const minted = await (await fetch("/api/chat-token", {method: "POST"})).json();
  const response = await fetch(gateway + "/proxy/chat/completions", {
    method: "POST",
    headers: {"Authorization": "Bearer " + minted.token, "Content-Type": "application/json"},
    body: JSON.stringify({model: "gpt-test", stream: true,
                          messages: [{role: "user", content: "Hi"}]}),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", words = [];
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const data = buffer.slice(6, end);
      buffer = buffer.slice(end + 2);
      if (data !== "[DONE]") words.push(JSON.parse(data).choices[0].delta.content);
    }
  }
  return {status: response.status, user: minted.user, text: words.join("")};
}
</script>
<p>chat</p>
"""


def app_server(gateway_url: str, origin: str) -> Flask:
    """The app's own server: it knows its user, holds the client key, and mints for the page."""
    app = Flask(__name__)

    @app.get("/")
    def page():
        return PAGE

    @app.post("/api/chat-token")
    def chat_token():
        answer = requests.post(
            gateway_url + "/sessions",
            headers={"Authorization": f"Bearer {WEB_KEY}"},
            json={"user": "browser-user", "origin": origin, "ttl": "5m"},
            timeout=10,
        )
        answer.raise_for_status()
        return answer.json()

    return app


@pytest.fixture(scope="module")
def app_and_gateway(fake_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sessions-browser")
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    config = live_session_config(fake_upstream.url, f"sqlite:///{folder}/limits.sqlite3")
    config["clients"]["web-chat"]["allowedOrigins"] = [origin]
    (gateway,) = _start(config, folder, count=1)
    server = make_server("127.0.0.1", port, app_server(gateway.url, origin), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield origin, gateway
    server.shutdown()
    _stop_and_check_logs([gateway], [])


def test_a_page_gets_a_token_from_its_server_and_streams_a_completion(
    browser,  # noqa: F811 - the fixture imported above
    app_and_gateway,
):
    origin, gateway = app_and_gateway
    page = browser.new_page()
    try:
        page.goto(origin + "/")
        result = page.evaluate("gateway => chat(gateway)", gateway.url)
    finally:
        page.close()
    assert result == {"status": 200, "user": "browser-user", "text": "Hello from the fake upstream"}
    # The stream's access line is written once its answer has ended: wait for it.
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in gateway.access_lines() if line.get("user") == "browser-user"]
        if len(lines) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [line["path"] for line in lines] == ["/sessions", "/chat/completions"]
