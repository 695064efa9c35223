"""`stockade serve`: the multi-tenant HTTP API over the manager."""
