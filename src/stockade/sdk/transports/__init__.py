"""Transports carry SDK calls to where sandboxes run: in this process (local) or a server (remote)."""
