"""ciard-deploy: distill robust compact classifiers, export them, and verify them on the runtime."""

__version__ = "0.1.0"
