"""Build and launch the promptkd Gradio app."""

from __future__ import annotations

import os

# Gradio reads this when it is imported: no usage statistics leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import gradio as gr

from promptkd.webui.common import AppContext, AppPaths, ModelCache
from promptkd.webui.compare import create_compare_tab
from promptkd.webui.inspect_tab import create_inspect_tab
from promptkd.webui.runner import get_runner
from promptkd.webui.runs_tab import create_runs_tab
from promptkd.webui.spaces import is_spaces
from promptkd.webui.train import create_train_tab

logger = logging.getLogger("promptkd.webui")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Loaded models kept per app process for the Compare and Inspect tabs.
MODEL_CACHE_SIZE = 4

INTRO = (
    "# promptkd\n"
    "Prompt-based, uncertainty-aware knowledge distillation of generative LMs. **Train** a student with a strategy "
    "and watch its curves, **Compare** models on a prompt, **Inspect** per-token teacher entropy and kept sets, and "
    "rank finished runs in **Runs**."
)


def build_app(root: Optional[str | Path] = None, spaces: Optional[bool] = None) -> gr.Blocks:
    """Build the app for the runs folder `root` (default $PROMPTKD_HOME/runs).

    `spaces` switches Spaces mode on or off; by default it is on when SPACE_ID is set.
    """
    paths = AppPaths.from_root(root)
    ctx = AppContext(
        paths=paths,
        runner=get_runner(paths.runs, paths.home),
        models=ModelCache(MODEL_CACHE_SIZE),
        spaces=is_spaces() if spaces is None else spaces,
    )
    logger.info("Building the app: runs root %s, home %s, Spaces mode %s", paths.runs, paths.home, ctx.spaces)

    with gr.Blocks(title="promptkd", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train = create_train_tab(ctx)
            with gr.Tab("Compare", id="compare"):
                compare = create_compare_tab(ctx)
            with gr.Tab("Inspect", id="inspect"):
                inspect = create_inspect_tab(ctx)
            with gr.Tab("Runs", id="runs"):
                runs = create_runs_tab(ctx)

        tabs = [train, compare, inspect, runs]
        outputs = [component for tab in tabs for component in tab["attach_outputs"]]

        def attach():
            """Page load: fill the run and model lists and reattach the Train tab to a running run."""
            values = []
            for tab in tabs:
                result = tab["attach"]()
                values.extend(result if isinstance(result, tuple) else (result,))
            return tuple(values)

        demo.load(attach, outputs=outputs, api_name="attach")
    demo.promptkd_context = ctx
    return demo


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="Launch the promptkd Gradio app.")
    parser.add_argument(
        "--host", default=os.environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST),
        help="Address to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1). Use 0.0.0.0 only on a trusted network.",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
        help="Port to serve on (default: $GRADIO_SERVER_PORT or 7860).",
    )
    parser.add_argument("--root", default=None, help="Runs folder (default: $PROMPTKD_HOME/runs, or ./checkpoints/runs when PROMPTKD_HOME is not set).")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from promptkd.runs import setup_logging

    args = parse_args(argv)
    setup_logging(logging.INFO)
    demo = build_app(args.root)
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False)
    except OSError as error:
        # Gradio 6.31 raises a plain OSError ("Cannot find empty port ...") when the port is taken.
        if "empty port" not in str(error):
            raise
        print(f"error: port {args.port} on {args.host} is in use: pass --port with a free port (or stop the other server).", file=sys.stderr)
        return 2
    return 0
