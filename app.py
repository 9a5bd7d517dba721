"""Launch the promptkd Gradio app: `python app.py [--host 127.0.0.1] [--port 7860] [--root RUNS_FOLDER]`."""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from promptkd.webui import main

if __name__ == "__main__":
    sys.exit(main())
