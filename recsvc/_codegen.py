"""Generate the gRPC/protobuf code in ``recsvc.v1`` from ``proto/``.

Policy: generated code is produced at build time (``setup.py`` calls
:func:`generate` from its ``build_py`` step, for regular and editable installs)
and is ignored by git. It is written into the source tree so that editable
installs and the built wheel import the very same modules. Run by hand with::

    python -m recsvc._codegen

protoc runs with ``-I proto`` so the output imports itself as ``recsvc.v1...``
with no rewriting.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Run protoc over every ``.proto`` under ``proto/``; return the outputs."""
    from grpc_tools import protoc  # build-time dependency only
    import grpc_tools

    protos = proto_files()
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    outputs = []
    for p in protos:
        rel = p.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            outputs.append(out_dir / (str(rel) + suffix))
    return outputs


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
    sys.exit(0)
