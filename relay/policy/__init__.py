"""Transforms over message bytes (content repair, S/MIME, DKIM): pure functions of the bytes and
the policy, called by delivery per copy. Imports neither relay.smtp nor relay.delivery."""
