"""The native HTTP API, one router per concern."""
