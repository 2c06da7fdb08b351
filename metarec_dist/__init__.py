"""metarec-dist: distributed trainer for transferable sequential recommendation."""
__version__ = "0.1.0"
