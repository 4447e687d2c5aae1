"""signal_srv: a WebRTC signaling server for many concurrent 1:1 calls."""

__version__ = "0.1.0"
