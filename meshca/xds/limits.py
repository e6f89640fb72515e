"""Per-caller limits: how many streams, and how many watched names, one caller may hold.

Each watched name costs the server memory (the name, its parsed request, the resource
built for it), and a caller chooses how many it asks for: without a bound, one workload
asking for thousands of distinct ``root-cert-for-mtls-inbound:<any>/<any>`` names on a
few streams grew the server by gigabytes. A caller is the account a stream is counted
against (:attr:`meshca.xds.auth.Caller.account`): its uid on the Unix socket, its SPIFFE
ID over mutual TLS, so several proxies of one identity share one budget. One
:class:`CallerLimits` is shared by the SDS and ADS engines.

Over a limit, the request is refused (RESOURCE_EXHAUSTED, with a message that names the
limit and the option that raises it); nothing is held for it.
"""

from __future__ import annotations

from collections import Counter

from meshca.xds.auth import Caller

DEFAULT_MAX_STREAMS = 1000
DEFAULT_MAX_NAMES = 10_000


class CallerLimits:
    """Counts streams and watched names per caller account; refuses what is over."""

    def __init__(
        self, max_streams: int = DEFAULT_MAX_STREAMS, max_names: int = DEFAULT_MAX_NAMES
    ) -> None:
        self.max_streams = max_streams
        self.max_names = max_names
        self._streams: Counter[str] = Counter()
        self._names: Counter[str] = Counter()
        self._held: dict[int, dict[str, int]] = {}  # stream id -> type URL -> names watched

    def open_stream(self, caller: Caller) -> str | None:
        """Count a new stream of ``caller``; why it is refused, or None."""
        account = caller.account
        if self._streams[account] >= self.max_streams:
            return (
                f"{caller.account} already holds {self._streams[account]} streams, the most "
                f"one caller may hold (max_streams_per_caller)"
            )
        self._streams[account] += 1
        return None

    def close_stream(self, caller: Caller, stream_id: int) -> None:
        account = caller.account
        self._streams[account] -= 1
        if self._streams[account] <= 0:
            del self._streams[account]
        released = sum(self._held.pop(stream_id, {}).values())
        if released:
            self._names[account] -= released
            if self._names[account] <= 0:
                del self._names[account]

    def request(self, count: int) -> str | None:
        """Why a request naming ``count`` resources is refused, or None."""
        if count > self.max_names:
            return (
                f"{count} resource names in one request; at most {self.max_names} "
                "(max_names_per_caller)"
            )
        return None

    def watch(self, caller: Caller, stream_id: int, type_url: str, count: int) -> str | None:
        """Let the stream watch ``count`` names of ``type_url`` (replacing what it watched);
        why that is refused, or None (then it is counted)."""
        problem = self.request(count)
        if problem is not None:
            return problem
        account = caller.account
        held = self._held.setdefault(stream_id, {})
        before = held.get(type_url, 0)
        total = self._names[account] - before + count
        if total > self.max_names:
            return (
                f"{caller.account} would watch {total} resource names over its streams; at most "
                f"{self.max_names} (max_names_per_caller)"
            )
        held[type_url] = count
        if total:
            self._names[account] = total
        else:
            self._names.pop(account, None)
        return None
