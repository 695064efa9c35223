"""The service core: what every front end (the SDK's local mode, the server, MCP, the E2B wire) asks."""
