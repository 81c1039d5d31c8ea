"""Command line: pyllm story | generate | chat | serve | pull | convert | bench."""

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import PyllmError, first_line
from .scheduler import KV_MEMORY_GB, MAX_QUEUE, MAX_RUNNING


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error: ...` line like every other error."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def add_model_flags(parser):
    from .formats import QUANTIZE_CHOICES
    parser.add_argument("--model", help="a Hugging Face model directory or a GGUF file "
                                        "(default: SmolLM2-135M-Instruct's Q4_1 GGUF, pulled on first use)")
    parser.add_argument("--backend", default="cpu", help="cpu (default: the C kernels), reference (plain NumPy), "
                                                         "cuda, or cuda-emu (the CUDA kernels run on the CPU)")
    parser.add_argument("--dtype", choices=["f32", "f16", "bf16"], help="compute dtype (default: the model's)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="quantize a safetensors model's matrices while loading (GGUF files run as stored)")


def add_sampling_flags(parser, max_tokens):
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)


def sampling_from(args):
    from .sampling import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def check_model_exists(args):
    if args.model is not None and not Path(args.model).exists():
        raise PyllmError(f"model not found: {args.model} (a model directory or a GGUF file)")


def load_llm(args):
    from .engine import LLM
    check_model_exists(args)
    # a load bar is for people watching a terminal, not for logs and pipes
    return LLM(args.model, backend=args.backend, dtype=args.dtype, quantize=args.quantize,
               show_progress=sys.stderr.isatty())


def print_stats(out):
    s = out.stats
    print(f"[{s['prompt_tokens']} prompt tokens ({s['cached_tokens']} cached), {s['generated_tokens']} generated, "
          f"{out.finish_reason}] prefill {s['prefill_tok_s']:.1f} tok/s, decode {s['decode_tok_s']:.1f} tok/s",
          file=sys.stderr)


def cmd_story(args):
    from .engine import Output, StepTimer
    sampling = sampling_from(args)  # bad flag values fail before the model loads
    llm = load_llm(args)
    seq = llm.new_sequence(llm.encode_prompt(args.prompt), sampling)
    print(args.prompt, end="", flush=True)
    timer = StepTimer([seq])
    for _, piece in timer.wrap(llm.run([seq])):
        print(piece, end="", flush=True)
    print()
    print_stats(Output.of(seq, timer))


def cmd_generate(args):
    sampling = sampling_from(args)
    llm = load_llm(args)
    out = llm.generate(args.prompt, sampling)
    if args.json:
        print(json.dumps({"prompt_ids": out.prompt_ids, "new_ids": out.token_ids, "text": out.text,
                          "finish_reason": out.finish_reason, "timings": out.stats}))
    else:
        print(out.text)


def cmd_chat(args):
    from .chat_repl import repl
    sampling = sampling_from(args)
    repl(load_llm(args), args.system, sampling)


def cmd_serve(args):
    from .pull import ensure_default_model
    checks = [(args.max_running >= 1, "--max-running must be >= 1"), (args.max_queue >= 1, "--max-queue must be >= 1"),
              (0 < args.kv_memory_gb < 1e6, "--kv-memory-gb must be a positive number"),
              (0 <= args.port <= 65535, "--port must be 0-65535"), (args.api_key != "", "--api-key must not be empty"),
              (args.replicas is None or args.replicas >= 1, "--replicas must be >= 1"),
              (args.threads is None or args.threads >= 1, "--threads must be >= 1"),
              (args.ray_address is None or args.replicas is not None, "--ray-address needs --replicas N")]
    for ok, message in checks:
        if not ok:
            raise PyllmError(message)
    if args.replicas is not None:
        serve_replicas(args)
        return
    from .backends import THREADS_ENV
    from .server.run import make_server  # before the model loads, so a missing dependency fails fast
    if args.threads is not None:
        os.environ[THREADS_ENV] = str(args.threads)
    args.model = args.model or str(ensure_default_model())
    llm = load_llm(args)
    server = make_server(llm, model_name(args.model), host=args.host, port=args.port, api_key=args.api_key,
                         max_running=args.max_running, max_queue=args.max_queue, kv_memory_gb=args.kv_memory_gb,
                         prefix_cache_scope=args.prefix_cache_scope, cors_origin=args.cors_origin)
    print(f"pyllm serve: http://{args.host}:{args.port}/ (OpenAI API under /v1)", file=sys.stderr)
    server.run()


def serve_replicas(args):
    """`pyllm serve --replicas N`: this process is the HTTP ingress (tokenizer only, no weights);
    N engine replicas, each loading the model, run as Ray Serve deployments."""
    from .backends import CORES
    from .frontend import Frontend
    from .pull import ensure_default_model
    try:
        from .server.run import serve_engine
        from .server.ray_engine import RayEngine
        from .server.ray_launch import deploy, ray_session
    except ImportError as exc:
        raise PyllmError(f"--replicas needs Ray Serve, and {exc.name} is not installed: "
                         "pip install -e '.[ray]'") from None
    check_model_exists(args)
    model = str(Path(args.model or ensure_default_model()).resolve())  # replicas load it by this path
    frontend = Frontend.load(model)  # a bad model stops here, before Ray starts
    threads = args.threads or max(1, CORES // args.replicas)
    with ray_session(args.ray_address, args.replicas, threads):
        handles = deploy(model, args.replicas, threads, args.backend, args.dtype, args.quantize, args.max_running,
                         args.max_queue, args.kv_memory_gb)
        server = serve_engine(frontend, RayEngine(handles), model_name(model), host=args.host, port=args.port,
                              api_key=args.api_key, prefix_cache_scope=args.prefix_cache_scope,
                              cors_origin=args.cors_origin)
        print(f"pyllm serve: http://{args.host}:{args.port}/ (OpenAI API under /v1), {args.replicas} replicas "
              f"of {threads} threads on Ray", file=sys.stderr)
        server.run()


def model_name(model) -> str:
    """What the API calls a model: its directory's name, or its GGUF file's name without .gguf."""
    path = Path(model).resolve()
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def cmd_pull(args):
    from .pull import pull
    print(pull(args.name, dtype=args.dtype))


def cmd_convert(args):
    from .gguf import convert_gguf
    print(convert_gguf(args.gguf, args.out_dir, dtype=args.dtype))


def cmd_bench(args):
    if args.peer:  # GGUF files against llama.cpp on the same file: the per-format benchmark
        from .benchmarks.quant_bench import main as quant_bench_main
        if args.model is None or not Path(args.model).is_file():
            raise PyllmError("--peer llama.cpp compares GGUF files: give --model FILE.gguf")
        quant_bench_main(["--files", args.model, "--peer", args.peer, "--out", args.out, "--rounds", str(args.rounds),
                          "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
                          "--batches", args.batches])
        return
    from .benchmarks.bench import main as bench_main
    bench_main(args)


def build_parser():
    from importlib.metadata import PackageNotFoundError, version
    parser = ArgumentParser(prog="pyllm", description="Run Llama-family models on the CPU or a GPU.")
    try:
        parser.add_argument("--version", action="version", version=f"pyllm {version('pyllm')}")
    except PackageNotFoundError:  # run from a checkout that was never installed
        parser.add_argument("--version", action="version", version="pyllm (not installed)")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("story", help="continue a text, streaming to stdout")
    add_model_flags(p)
    p.add_argument("--prompt", default="Once upon a time")
    add_sampling_flags(p, max_tokens=256)
    p.set_defaults(func=cmd_story)

    p = sub.add_parser("generate", help="one completion, optionally as JSON for scripts")
    add_model_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_sampling_flags(p, max_tokens=256)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal (/reset, /exit)")
    add_model_flags(p)
    p.add_argument("--system", help="system prompt")
    add_sampling_flags(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PYLLM_API_KEY"),
                   help="require Authorization: Bearer KEY on the API (default: $PYLLM_API_KEY, else none)")
    p.add_argument("--max-running", type=int, default=MAX_RUNNING, help="sequences decoded together per step")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests that may wait; more get 503")
    p.add_argument("--kv-memory-gb", type=float, default=KV_MEMORY_GB,
                   help="the KV pool: blocks of 16 tokens taken as sequences grow, full ones kept by "
                        "content for later prompts until needed (default: %(default)s)")
    p.add_argument("--prefix-cache-scope", choices=["global", "key"],
                   help="share cached KV blocks among all requests, or only among those with the same "
                        "API key (default: key when --api-key is set, else global)")
    p.add_argument("--cors-origin", help="allow browser calls from this origin, e.g. http://localhost:3000")
    p.add_argument("--threads", type=int, help="threads of the C kernels per engine (default: every core, "
                                                 "shared evenly among --replicas)")
    p.add_argument("--replicas", type=int, help="run N engine replicas on Ray Serve behind this server, routed "
                                                 "by cached prefix (needs pip install -e '.[ray]')")
    p.add_argument("--ray-address", help="with --replicas: the Ray cluster to join (default: start a local one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("pull", help="download a known model's GGUF into models/ (with --dtype: also convert it)")
    p.add_argument("name", nargs="?", default="smollm2")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], help="convert into a Hugging Face directory of this dtype")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert", help="convert a llama GGUF file into a Hugging Face directory")
    p.add_argument("gguf")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bench", help="benchmark load, prefill and decode (and transformers when installed)")
    add_model_flags(p)
    p.add_argument("--out", default="bench-out", help="folder for JSON, markdown and PNG")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--batches", default="4,8", help="batched decode sizes")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--peer", choices=["llama.cpp"], help="a GGUF --model against llama.cpp (llama-cpp-python) on the same "
                                                         "file, beside the memory roofline (benchmarks/quant_bench.py)")
    p.add_argument("--rounds", type=int, default=3, help="each speed is the best of this many interleaved rounds")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # plain `pyllm`: what it can do
        parser.print_help()
        return
    try:
        args.func(args)
    except PyllmError as exc:
        fail(first_line(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # e.g. `pyllm story | head`
        # stdout is gone: point it at devnull so the flush at exit does not complain
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:  # a bug or an unexpected OS error: still one line, unless debugging
        if os.environ.get("PYLLM_DEBUG"):
            raise
        fail(f"unexpected {type(exc).__name__}: {first_line(exc)} (PYLLM_DEBUG=1 shows the traceback)")


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
