"""lmpipe: the core library. Pure functions and small classes; never imports prefect."""

__version__ = "0.1.0"
