"""The terminal chat loop behind `pyllm chat`; works with a terminal or piped stdin. On a terminal,
readline gives the prompt line editing and a history of this session's lines (up/down arrows)."""

import sys

from .chat import ChatSession
from .errors import PyllmError


def repl(llm, system, sampling):
    session = ChatSession(llm, system, sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        enable_line_editing()
        print("pyllm chat: /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops an answer.", file=sys.stderr)
    while (text := read_line(interactive)) is not None:
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
        elif text:
            run_turn(session, text)


def enable_line_editing():
    """Importing readline is what makes input() edit lines and keep history; piped input needs neither."""
    try:
        import readline  # noqa: F401
    except ImportError:  # a Python built without it: plain input() still works
        pass


def read_line(interactive: bool) -> str | None:
    """The next input line, stripped; None at end of input. Ctrl-C at the prompt only clears the line."""
    while True:
        try:
            return input("> " if interactive else "").strip()
        except EOFError:
            return None
        except KeyboardInterrupt:
            print(file=sys.stderr)


def run_turn(session: ChatSession, text: str):
    """Stream one answer to stdout. Ctrl-C stops it and an error skips it; either way the
    session stays usable for the next line."""
    answer = None
    try:
        answer = session.send(text)
        if session.dropped_turns:
            print(f"[context window full: dropped the {session.dropped_turns} oldest turn(s)]", file=sys.stderr)
        for piece in answer:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        if answer is not None:
            answer.close()  # records the partial answer so the next turn stays consistent
        print()
        print("[stopped]", file=sys.stderr)
        return
    except PyllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return
    print()
    seq = session.last_sequence
    if seq.finish_reason == "length" and len(seq.prompt_ids) + len(seq.output_ids) >= session.context:
        print("[context window full: the answer was cut; older turns will be dropped next]", file=sys.stderr)
