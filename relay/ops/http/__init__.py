"""The HTTP server process: /healthz, /metrics and the JSON API (aiohttp, off the SMTP path)."""
