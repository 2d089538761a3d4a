"""Alfred: a WhatsApp Cloud API bot runtime that never loses a message."""

__version__ = "0.1.0"
