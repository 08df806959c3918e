"""Transforms of a message's bytes before it leaves (DKIM signing, content repair): pure
functions over bytes and policy. Imports neither relay.smtp nor relay.delivery."""
