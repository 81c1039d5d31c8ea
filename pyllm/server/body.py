"""Reading a request body: a size limit, JSON, and a nesting limit checked without recursion."""

import json

from fastapi import Request

from .errors import RequestError

MAX_JSON_DEPTH = 64  # deeper bodies are refused: nothing here nests that far, and recursion has limits


async def read_json(request: Request, limit: int):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body of {declared} bytes is over the limit of {limit}", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"request body is over the limit of {limit} bytes", 413)
    try:
        parsed = json.loads(body)
    except RecursionError:
        raise RequestError(f"malformed JSON body: nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON body: {exc}") from None
    check_depth(parsed)
    return parsed


def check_depth(value):
    """Refuse JSON nested deeper than MAX_JSON_DEPTH, without recursing."""
    level = [value]
    for _ in range(MAX_JSON_DEPTH + 1):
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return
    raise RequestError(f"malformed JSON body: nested more than {MAX_JSON_DEPTH} levels deep")
