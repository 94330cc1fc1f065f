"""Write the ``tiny_llm`` Triton model repository (see the package docstring)."""


from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

TINY_LLM_CONFIG = """\
# Written by serve_app.triton_models: the tiny model, vLLM-backend tensor convention.
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] }},
  {{ name: "stream", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "sampling_parameters", data_type: TYPE_STRING, dims: [ 1 ], optional: true }},
  {{ name: "exclude_input_in_output", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "return_finish_reason", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "return_num_input_tokens", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "return_num_output_tokens", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "cumulative_output", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }}
]
output [
  {{ name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] }},
  {{ name: "finish_reason", data_type: TYPE_STRING, dims: [ -1 ] }},
  {{ name: "num_input_tokens", data_type: TYPE_UINT32, dims: [ 1 ] }},
  {{ name: "num_output_tokens", data_type: TYPE_UINT32, dims: [ 1 ] }}
]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters {{ key: "model_path", value: {{ string_value: "{model_path}" }} }}
parameters {{ key: "torch_threads", value: {{ string_value: "{torch_threads}" }} }}
"""


def write_tiny_repository(dest: str | Path, model_path: str | Path | None = None, *,
                          name: str = "tiny_llm", torch_threads: int = 1) -> Path:
    """Write (or overwrite) ``dest/name`` and return the repository directory ``dest``.

    ``model_path`` defaults to the tiny model, built on first use.  The path is baked
    into config.pbtxt because a Python-backend model learns its settings only from
    there.
    """
    if model_path is None:
        from serve_app.tiny_model import ensure_tiny_model
        model_path = ensure_tiny_model()
    repo = Path(dest)
    version = repo / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    source = resources.files("serve_app.triton_models.tiny_llm").joinpath("model.py")
    with resources.as_file(source) as model_py:
        shutil.copyfile(model_py, version / "model.py")
    text = TINY_LLM_CONFIG.format(model_path=Path(model_path).resolve(),
                                  torch_threads=torch_threads)
    (repo / name / "config.pbtxt").write_text(text)
    return repo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny model's Triton repository.")
    parser.add_argument("dest", help="repository directory (created if missing)")
    parser.add_argument("--model-path", default=None, help="default: the tiny model (built once)")
    parser.add_argument("--name", default="tiny_llm")
    args = parser.parse_args(argv)
    print(write_tiny_repository(args.dest, args.model_path, name=args.name))


if __name__ == "__main__":
    main()
