"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Optional


class APIError(Exception):
    """A request the server refuses: the status code and OpenAI's error object."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST,
                 type: str = "invalid_request_error", param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, int(status), type, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}
