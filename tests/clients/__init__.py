"""Real clients through the live gateway: headless Chromium and the OpenAI and Anthropic SDKs."""
