"""The source text of a kernels/*.cu file as every compiler gets it: local headers pasted in.

CuPy keys its on-disk kernel cache (~/.cupy/kernel_cache) on the source string, the options and
the NVRTC version, not on the files an #include pulls in. So a quoted #include of a header beside
the file ("common.cuh") is expanded here, for CuPy, the NVRTC gate and cuda-emu alike: editing a
header, or upgrading pyllm in place, changes the source and with it every cache key. #line
directives keep compiler messages pointing at the header's own file and line.
"""

import re
from pathlib import Path

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\b")


def expand_local_includes(path) -> str:
    """The text of `path` with each quoted #include of an existing file beside it replaced by that
    file's expanded text, every file at most once (as #pragma once would); <...> includes and
    headers not found beside the file are left for the compiler."""
    return _expand(Path(path).resolve(), set())


def _expand(path: Path, seen: set) -> str:
    seen.add(path)
    lines = [f'#line 1 "{path.name}"']
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = _LOCAL_INCLUDE.match(line)
        header = (path.parent / match.group(1)).resolve() if match else None
        if header is not None and header.is_file():
            if header not in seen:
                lines += [_expand(header, seen), f'#line {number + 1} "{path.name}"']
            else:
                lines.append("")
        else:
            lines.append("" if _PRAGMA_ONCE.match(line) else line)  # the header is pasted once already
    return "\n".join(lines)
