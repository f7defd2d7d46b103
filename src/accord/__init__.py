"""accord: distil the reasoning of several teacher LLMs into one small student."""

__version__ = "0.1.0"
