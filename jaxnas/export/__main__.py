"""``python -m jaxnas.export <run folder> --format stablehlo|onnx [--output PATH]``: write the run's best model portably.

Prints the path written (default ``<run>/model/model.stablehlo`` or ``model.onnx``, each with a ``.json`` sidecar).
Exit status 2 for bad input (no exported model in the folder, an unknown format, ONNX without its packages): one
line on stderr saying what was wrong and what to do. The input is checked before jax is imported, so it fails at
once.
"""

from __future__ import annotations

import argparse
import sys

from jaxnas.export import FORMATS, ExportError, require_onnx, export_onnx, export_stablehlo, model_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxnas.export", description="Export a run's best model.")
    parser.add_argument("run", metavar="RUN_FOLDER", help="a finished search run (or its model/ folder)")
    # Checked below rather than with choices=, so a bad value is one line on stderr like every other bad input.
    parser.add_argument("--format", default="stablehlo",
                        help="stablehlo (the default; runs with only jax) or onnx (runs in onnxruntime; needs "
                             "jaxnas[onnx] and jax2onnx)")
    parser.add_argument("--output", metavar="PATH",
                        help="file to write (default <run>/model/model.stablehlo or model.onnx)")
    args = parser.parse_args(argv)
    try:
        if args.format not in FORMATS:
            raise ExportError(f"unknown --format {args.format!r}; use --format stablehlo or --format onnx")
        if args.format == "onnx":
            require_onnx()
        folder = model_folder(args.run)
        export = export_onnx if args.format == "onnx" else export_stablehlo
        path = export(folder, args.output)  # jax is imported only now, once the input is good
    except (ValueError, OSError) as error:  # ExportError, an invalid arch.json (load_model), an unwritable --output
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
