"""The promptkd Gradio app: Train, Compare, Inspect and Runs tabs (`python app.py`)."""

from promptkd.webui.app import build_app, main

__all__ = ["build_app", "main"]
