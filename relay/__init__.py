"""invoice-relay: a durable SMTP relay for electronic-invoice mail."""

__version__ = "0.1.0"
