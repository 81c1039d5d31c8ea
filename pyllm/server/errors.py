"""RequestError: an HTTP error response in OpenAI's shape."""


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type, headers

    @classmethod
    def overloaded(cls, message: str) -> "RequestError":
        """503 with Retry-After: the engine cannot take the request now; a retry may succeed."""
        return cls(message, 503, type="server_error", code="overloaded", headers={"Retry-After": "1"})

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}
