"""Delivery: scheduling, next-hop resolution, the SMTP client, retries and DSNs."""
