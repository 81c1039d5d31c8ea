"""The terminal chat loop behind `pyllm chat`; works with a terminal or piped stdin."""

import sys


def repl(llm, system, sampling):
    session = llm.chat_session(system=system)
    session.sampling = sampling
    interactive = sys.stdin.isatty()
    if interactive:
        print("pyllm chat: /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        answer = session.send(text)
        if session.dropped_turns:
            print(f"[context window full: dropped the {session.dropped_turns} oldest turn(s)]", file=sys.stderr)
        try:
            for piece in answer:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            answer.close()  # records the partial answer so the next turn stays consistent
            print("\n[stopped]", file=sys.stderr)
        print()
        seq = session.last_sequence
        if seq is not None and seq.finish_reason == "length" and seq.cache.length >= seq.cache.capacity:
            print("[context window full: the answer was cut; older turns will be dropped next]", file=sys.stderr)
