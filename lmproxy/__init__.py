"""lmproxy: start model servers on demand through systemd socket activation."""

__version__ = "0.1.0"
