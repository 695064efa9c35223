"""The in-sandbox agent. Runs INSIDE the sandbox on the sandbox's python3: standard library only.

``protocol`` is shared with the host; ``server`` is the program the runtime starts as the sandbox's init.
"""
