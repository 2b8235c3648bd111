"""`--target mobile`: the exported graph also in onnxruntime's ORT format, with its operator list.

onnxruntime's mobile and reduced builds load `.ort` files (a flatbuffer, no protobuf parser, no
graph optimizers needed at load). The file is written by onnxruntime itself: the graph is loaded
with the extended optimization level (fusions that run on any CPU; the "all" level would add
layout changes tuned to this machine's instruction set) and saved as ORT. The operator config
(`<model>.required_operators.config`, one `domain;opset;Op,Op` line per opset) is what a reduced
build is configured with (`build.sh --include_ops_by_config`); it is read from the `.ort` file by
onnxruntime's own tool.
"""

from __future__ import annotations

from pathlib import Path

from edgelm.errors import ExportError, first_line
from edgelm.export.quiet import quiet_loggers

TARGETS = ("default", "mobile")


def ort_names(model_file: str) -> tuple[str, str]:
    stem = Path(model_file).stem
    return f"{stem}.ort", f"{stem}.required_operators.config"


def write_ort(onnx_path: Path) -> tuple[str, str]:
    """Write the .ort file and its operator config next to `onnx_path`; return both names."""
    import onnxruntime as ort

    ort_name, config_name = ort_names(onnx_path.name)
    folder = onnx_path.parent
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / ort_name)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.intra_op_num_threads = 1
    try:
        ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
        with quiet_loggers("ort_format_model.utils"):  # an INFO line naming the temporary folder
            _write_operator_config(folder / ort_name, folder / config_name)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises untyped errors
        raise ExportError(f"writing the ORT-format model failed ({first_line(err)})") from None
    return ort_name, config_name


def _write_operator_config(ort_path: Path, config_path: Path) -> None:
    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    create_config_from_models([ort_path], config_path, enable_type_reduction=False)
    # the tool names the model by its absolute path, here a temporary folder: keep the file name only
    lines = config_path.read_text().splitlines()
    fixed = [f"# - {ort_path.name}" if line.startswith("# - ") else line for line in lines]
    config_path.write_text("\n".join(fixed) + "\n")
