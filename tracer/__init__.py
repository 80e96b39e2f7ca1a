"""tcpcollide-trace: live tracing of TCP SYNs that collide with CLOSE_WAIT sockets."""

__version__ = "0.4.0"
