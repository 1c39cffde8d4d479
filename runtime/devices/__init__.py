"""The devices of the guest's machine, each in its own module, on the I/O-port bus (bus.py)."""
