"""`pyllm chat` on a terminal (a pty): readline recalls the previous line with the up arrow."""

import os
import pty
import subprocess
import sys
import time

from conftest import REPO, make_tiny_model
from test_cli import read_until


def test_up_arrow_recalls_the_last_line(tmp_path):
    model_dir = tmp_path / "ctx64"
    make_tiny_model(model_dir, max_position_embeddings=64)
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pyllm", "chat", "--model", str(model_dir), "--max-tokens", "2"],
                            stdin=child, stdout=child, stderr=child, cwd=REPO)
    os.close(child)
    seen, deadline = bytearray(), time.monotonic() + 30
    try:
        read_until(main, seen, lambda s: b"> " in s, deadline)
        os.write(main, b"a line to recall\n")
        read_until(main, seen, lambda s: s.count(b"> ") >= 2, deadline)  # answered, at the prompt again
        mark = len(seen)
        os.write(main, b"\x1b[A")  # up arrow: readline puts the last line back on the prompt
        read_until(main, seen, lambda s: b"a line to recall" in s[mark:], deadline)
        assert b"^[[A" not in seen[mark:]  # without readline the terminal would echo the escape
        os.write(main, b"\n/exit\n")
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        os.close(main)
