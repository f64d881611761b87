"""`diffseg` command line: segment images, evaluate on benchmarks, serve the demo, process datasets on Ray.

Known errors become a one-line message and exit status 2; set DIFFSEG_TRACEBACK=1 for the full traceback.
"""

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from .app import add_app_command
from .dataset import add_segment_dataset_command
from .evaluate import add_evaluate_command
from .segment import add_segment_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffseg", description="Unsupervised zero-shot segmentation with Stable Diffusion (DiffSeg)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_segment_command(commands)
    add_evaluate_command(commands)
    add_app_command(commands)
    add_segment_dataset_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # diffusers passes a deprecated argument to the hub client on every load; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("diffseg: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as error:  # FileNotFoundError is an OSError
        if os.environ.get("DIFFSEG_TRACEBACK"):
            raise
        print(f"diffseg: error: {error}", file=sys.stderr)
        print("(set DIFFSEG_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
