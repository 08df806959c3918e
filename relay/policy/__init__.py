"""Transforms of a message's bytes before it leaves (content repair, DKIM signing): pure
functions over bytes and policy. Imports neither relay.smtp nor relay.delivery."""
