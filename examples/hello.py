"""A first program to run in a stockade sandbox: `stockade run examples/hello.py`.

It shows what untrusted code sees from inside: its own user, an empty home, no network, no host files.
"""

import os
import socket

print(f"hello from the sandbox: uid={os.getuid()} cwd={os.getcwd()} hostname={socket.gethostname()}")
print("home contains:", sorted(os.listdir(os.path.expanduser("~"))))
print("/ contains:", sorted(os.listdir("/")))
try:
    socket.create_connection(("1.1.1.1", 443), timeout=2)
    print("network: reachable (unexpected!)")
except OSError as exc:
    print(f"network: unreachable ({exc.strerror or exc})")
for path in ("/root", "/home", "/var", "/etc/shadow"):
    print(f"{path}: {'visible' if os.path.exists(path) else 'absent'}")
