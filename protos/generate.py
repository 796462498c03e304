"""Regenerate the committed protobuf/gRPC Python code from protos/confide/v1/*.proto.

Run ``python -m confide.protos.generate`` after editing a .proto file, and commit the result.
``python -m confide.protos.generate --check`` exits 1 when the committed code is stale (CI runs it
through the test suite), so the wire contract and its Python face never drift apart.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / "confide" / "v1").glob("*.proto"))


def generate_into(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on the .proto files under ``root`` into ``out_dir``; return the generated
    files (paths relative to ``out_dir``)."""
    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(root)) for p in proto_files(root)],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    generated = []
    for path in sorted((out_dir / "confide" / "v1").glob("*_pb2*.py*")):
        # protoc writes "from confide.v1 import x_pb2" for the .proto files' imports of
        # "confide/v1/x.proto": it resolves as is, because this folder installs as the
        # package ``confide.v1`` (setup.py), the name of the protobuf package
        generated.append(path.relative_to(out_dir))
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    parser.add_argument("--root", type=Path, default=PROTO_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root: Path = args.root
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = generate_into(out, root)
        stale = []
        for rel in generated:
            target = root / rel
            if not target.exists() or not filecmp.cmp(out / rel, target, shallow=False):
                stale.append(str(rel))
                if not args.check:
                    target.write_bytes((out / rel).read_bytes())
        expected = {root / rel for rel in generated}
        extra = [p for p in (root / "confide" / "v1").glob("*_pb2*.py*") if p not in expected]
    if args.check:
        if stale or extra:
            print("stale generated code: " + ", ".join(stale + [str(p) for p in extra]))
            print("run: python -m confide.protos.generate")
            return 1
        print("generated protobuf code is up to date")
        return 0
    for path in extra:
        path.unlink()
    print(f"regenerated {len(stale)} file(s)" if stale else "already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
