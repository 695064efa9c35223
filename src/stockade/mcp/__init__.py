"""The MCP server (`stockade mcp`): stockade sandboxes as tools for any MCP client. Needs the `mcp` SDK."""

from .app import http_app, serve_http, serve_stdio
from .server import Hub, Options, build_server, supports_template

__all__ = ["Hub", "Options", "build_server", "http_app", "serve_http", "serve_stdio", "supports_template"]
