"""X-Callback-Url delivery (fnserve/callbacks.py) against a real HTTP receiver."""

from __future__ import annotations

import pytest

from fnserve.callbacks import Callback, CallbackSender, check_callback_url
from fnserve.errors import InvalidCallbackUrl
from tests.async_helpers import CallbackReceiver
from tests.helpers import wait_until
from tests.live import free_port


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "https://example.test/hook?a=1"])
def test_http_urls_are_accepted(url: str) -> None:
    assert check_callback_url(url) == url


@pytest.mark.parametrize("url", ["ftp://host/x", "file:///etc/passwd", "http:///nohost",
                                 "http://host:99999/", "http://a b/", "not a url", ""])
def test_other_urls_are_a_400(url: str) -> None:
    with pytest.raises(InvalidCallbackUrl) as caught:
        check_callback_url(url)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_callback_url"


def _callback(url: str) -> Callback:
    return Callback(url, b'{"ok": true}', {"Content-Type": "application/json",
                                           "X-Request-Id": "r-1", "X-Function-Name": "f",
                                           "X-Function-Status": "200"}, "r-1")


def test_a_callback_arrives_with_its_body_and_headers() -> None:
    sender = CallbackSender(backoff=0.05)
    with CallbackReceiver() as receiver:
        sender.send(_callback(receiver.url))
        [call] = receiver.wait_for(1)
        assert wait_until(lambda: sender.pending() == 0)
    sender.close()
    assert call.path == "/hook"
    assert call.body == b'{"ok": true}'
    assert call.headers["X-Request-Id"] == "r-1"
    assert call.headers["X-Function-Status"] == "200"
    assert call.headers["Content-Type"] == "application/json"


def test_a_failed_callback_is_retried_until_it_is_taken() -> None:
    sender = CallbackSender(backoff=0.05)
    with CallbackReceiver(statuses=(500, 503)) as receiver:
        sender.send(_callback(receiver.url))
        calls = receiver.wait_for(3)
        assert wait_until(lambda: sender.pending() == 0)
    sender.close()
    assert len(calls) == 3
    assert {call.body for call in calls} == {b'{"ok": true}'}


def test_retries_stop_after_three() -> None:
    sender = CallbackSender(backoff=0.02)
    with CallbackReceiver(statuses=(500,) * 10) as receiver:
        sender.send(_callback(receiver.url))
        receiver.wait_for(4)
        assert wait_until(lambda: sender.pending() == 0, timeout=10)
        assert len(receiver.calls) == 4  # the first attempt and 3 retries
    sender.close()


def test_a_client_error_is_final() -> None:
    sender = CallbackSender(backoff=0.02)
    with CallbackReceiver(statuses=(404,)) as receiver:
        sender.send(_callback(receiver.url))
        receiver.wait_for(1)
        assert wait_until(lambda: sender.pending() == 0)
        assert len(receiver.calls) == 1
    sender.close()


def test_an_unreachable_receiver_is_given_up_on() -> None:
    sender = CallbackSender(backoff=0.02, timeout=2.0)
    sender.send(_callback(f"http://127.0.0.1:{free_port()}/nobody"))
    assert wait_until(lambda: sender.pending() == 0, timeout=10)
    assert sender.close() == 0


def test_close_reports_what_was_not_sent() -> None:
    sender = CallbackSender(backoff=30.0)
    with CallbackReceiver(statuses=(500,)) as receiver:
        sender.send(_callback(receiver.url))
        receiver.wait_for(1)
        assert wait_until(lambda: sender.pending() == 1)  # its retry waits 30s
        assert sender.close(wait=0.0) == 1
