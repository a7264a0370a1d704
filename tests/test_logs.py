"""Logged exceptions show code, never the values of local variables."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from plings_hsm.logs import configure_logging

SECRET_TEXT = "local-secret-value-0123456789abcdef"


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """Put back the test suite's structlog configuration after the test."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _fail_with_secret_local() -> None:
    authorization = f"Bearer {SECRET_TEXT}"
    raise RuntimeError(f"failed with a header of {len(authorization)} characters")


class TestExceptionLogs:
    """An error logged with its traceback keeps local variables out of the output."""

    @pytest.mark.parametrize("json", [True, False])
    def test_locals_not_logged(
        self, json: bool, capsys: pytest.CaptureFixture[str], restore_structlog: None
    ) -> None:
        configure_logging("INFO", json=json)
        log = structlog.get_logger("test")
        try:
            _fail_with_secret_local()
        except RuntimeError as exc:
            log.error("request_failed", error=type(exc).__name__, exc_info=exc)
        output = capsys.readouterr().err
        assert "request_failed" in output
        assert "_fail_with_secret_local" in output
        assert SECRET_TEXT not in output


class TestSuiteLogs:
    """The test suite's own structlog setup prints plain tracebacks without locals."""

    def test_locals_not_printed(self, capsys: pytest.CaptureFixture[str]) -> None:
        log = structlog.get_logger("test")
        try:
            _fail_with_secret_local()
        except RuntimeError as exc:
            log.error("request_failed", error=type(exc).__name__, exc_info=exc)
        captured = capsys.readouterr()
        output = captured.out + captured.err
        assert "_fail_with_secret_local" in output
        assert SECRET_TEXT not in output
