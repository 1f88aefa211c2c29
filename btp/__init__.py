"""btp: mechanistic interpretability of code generation in LLMs."""

__version__ = "0.1.0"
