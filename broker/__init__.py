"""yikatong-broker: cross-region interoperability broker for the Sichuan-Chongqing one-card."""

__version__ = "0.1.0"
