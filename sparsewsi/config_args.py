"""Parsing the string argument of a config file's ``get_config(arg)`` (big_vision style).

``configs/x.py:llm=/models/qwen,full,cap=1024`` -> ``{"llm": "/models/qwen", "full": "1", "cap": "1024"}``:
comma-separated ``key=value`` items; a bare ``key`` is a switch set to ``"1"``. Kept free of heavy
imports so configs stay cheap to load.
"""

from __future__ import annotations


def parse_arg(arg: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip() if value else "1"
    return out
