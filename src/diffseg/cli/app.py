"""`diffseg app`: serve the interactive demo."""

from __future__ import annotations

import argparse

from ..config import AppConfig
from .checks import load_pipeline
from .options import add_model_arguments

_APP = AppConfig()


def run_app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise ImportError("`diffseg app` needs Gradio: pip install 'diffseg[app]' (or gradio).") from error
    from ..app.demo import launch

    launch(
        load_pipeline(args),
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        cache_size=args.cache_size,
    )
    return 0


def add_app_command(commands) -> None:
    p = commands.add_parser(
        "app",
        help="serve the interactive demo (Gradio)",
        description="Serve a Gradio page: upload an image, then move the sliders to re-segment "
        "the cached attention instantly. Needs the app extra: pip install 'diffseg[app]'.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument(
        "--max-upload-mb", type=float, default=_APP.max_upload_mb, help="refuse larger uploads (default: %(default)s)"
    )
    p.add_argument(
        "--cache-size",
        type=int,
        default=_APP.cache_size,
        help="bundles kept in memory (default: %(default)s)",
    )
    add_model_arguments(p)
    p.set_defaults(run=run_app)
