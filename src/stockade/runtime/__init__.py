"""Runtimes start sandboxes. Each gives the manager the same thing: a channel to the agent inside."""
