"""Inbound SMTP: the listener, access control, AUTH and the streaming DATA reader."""
