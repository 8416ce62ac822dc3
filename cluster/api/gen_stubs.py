"""Regenerate the pagoda.v1 Python stubs: ``python -m pagoda.cluster.api.gen_stubs``.

Needs ``grpcio-tools==1.84.*`` (the GPU image runs grpcio 1.84). The generated files import each
other as ``pagoda.v1``; this rewrites that to ``pagoda.cluster.api.gen.pagoda.v1`` so no top-level
``pagoda`` package is needed, relaxes the generated grpcio floor to 1.84.0 and drops the
protobuf runtime pin (see ``main``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
PROTO_ROOT = HERE / "proto"
OUT = HERE / "gen"
PROTO = "pagoda/v1/pagoda.proto"


def main() -> int:
    from grpc_tools import protoc

    OUT.joinpath("pagoda", "v1").mkdir(parents=True, exist_ok=True)
    for pkg in (OUT, OUT / "pagoda", OUT / "pagoda" / "v1"):
        pkg.joinpath("__init__.py").touch()
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={OUT}", f"--pyi_out={OUT}", f"--grpc_python_out={OUT}", PROTO]
    if protoc.main(args) != 0:
        return 1
    for path in OUT.joinpath("pagoda", "v1").glob("pagoda_pb2*.py*"):
        text = path.read_text()
        text = text.replace("from pagoda.v1 import", "from pagoda.cluster.api.gen.pagoda.v1 import")
        text = re.sub(r"GRPC_GENERATED_VERSION = '[^']+'", "GRPC_GENERATED_VERSION = '1.84.0'", text)
        # The gencode pins the protobuf runtime to >= the generator's (7.x here); the builder API it
        # uses exists since protobuf 4.21, so drop the pin to import beside the GPU image's protobuf.
        text = re.sub(r"from google\.protobuf import runtime_version as _runtime_version\n", "", text)
        text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", text)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
