"""The gvisor runtime: each sandbox is one runsc container, so user code talks to gVisor's Sentry (a kernel
in user space) instead of the host's. Same agent, channel, broker and policy as the jail."""
