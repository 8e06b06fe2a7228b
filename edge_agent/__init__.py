"""fedflock device runtime and the wire contract shared by all fedflock packages."""

__version__ = "0.1.0"
