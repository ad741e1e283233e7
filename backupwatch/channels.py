"""SPEC §10: the alert channels, each a list of Apprise URLs, and sending one message to them.

Apprise speaks SMTP, JSON and form webhooks, Slack, Teams, Telegram, ntfy, Matrix, PagerDuty,
Opsgenie and the rest; this module is the one place that imports it. Each URL is sent to on its
own, so that a delivery can record which URLs took a message and a retry goes only to the
others: a channel's working email is not sent the same alert again because its webhook failed.
A URL is known by a digest of it (`url_id`), never stored or logged with its password.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backupwatch.alerting import Message
from backupwatch.config import masked


def url_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class UrlResult:
    url_id: str
    shown: str  # the URL with its password masked
    ok: bool
    error: str | None = None


class Channels:
    """The configured channels (`config.AlertSettings.channel_urls()`), by name."""

    def __init__(self, urls: Mapping[str, Sequence[str]]) -> None:
        self._urls = {name: list(found) for name, found in urls.items() if found}
        self._senders: dict[str, Any] = {}

    def names(self) -> list[str]:
        return sorted(self._urls)

    def url_ids(self, channel: str) -> list[str]:
        return [url_id(url) for url in self._urls.get(channel, [])]

    def send(
        self, channel: str, message: Message, only: Collection[str] | None = None
    ) -> list[UrlResult]:
        """Send `message` to the channel's URLs (those in `only`, when given), one by one."""
        results = []
        for url in self._urls.get(channel, []):
            ident = url_id(url)
            if only is not None and ident not in only:
                continue
            results.append(self._send_one(url, ident, message))
        return results

    def _send_one(self, url: str, ident: str, message: Message) -> UrlResult:
        import apprise

        sender = self._senders.get(ident)
        if sender is None:
            sender = apprise.Apprise()
            if not sender.add(url):
                return UrlResult(ident, masked(url), False, "not a valid Apprise URL")
            self._senders[ident] = sender
        # Apprise reports why a send failed only through its logger: capture it for this call
        # (the delivery loop sends from one thread, so no other send shares the capture).
        with apprise.LogCapture(level=logging.WARNING) as captured:  # type: ignore[no-untyped-call]
            try:
                ok = bool(
                    sender.notify(
                        title=message.title,
                        body=message.body,
                        body_format=apprise.NotifyFormat.TEXT,
                    )
                )
            except Exception as exc:  # a plugin's bug must not end the delivery loop
                ok = False
                captured.write(f"{type(exc).__name__}: {exc}")
            text = captured.getvalue()
        error = None if ok else _last_line(text) or "the service did not accept it"
        return UrlResult(ident, masked(url), ok, error)


def _last_line(text: str) -> str:
    lines = [line.split(" - ", 2)[-1].strip() for line in text.splitlines() if line.strip()]
    return masked(lines[-1]) if lines else ""
