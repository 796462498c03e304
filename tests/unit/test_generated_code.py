"""The committed generated code matches the .proto files; the check notices when it does not."""

from __future__ import annotations

import shutil

from confide.protos.generate import PROTO_ROOT, main


def test_committed_generated_code_is_fresh():
    assert main(["--check"]) == 0


def test_check_fails_when_a_proto_changes(tmp_path, capsys):
    root = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT / "confide", root / "confide")
    assert main(["--check", "--root", str(root)]) == 0
    proto = root / "confide" / "v1" / "common.proto"
    proto.write_text(proto.read_text() + "\nmessage Extra { string x = 1; }\n")
    assert main(["--check", "--root", str(root)]) == 1
    assert "stale generated code" in capsys.readouterr().out
    assert main(["--root", str(root)]) == 0  # regenerating makes it fresh again
    assert main(["--check", "--root", str(root)]) == 0
