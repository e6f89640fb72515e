"""Helpers every layer may use: asyncio pieces, retry/backoff, private files, durations,
logging, address formatting, Unix sockets. They import nothing of meshca but each other."""
