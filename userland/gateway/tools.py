"""Tool calls in a model's reply, in the forms the gateway recognises.

    hermes   <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
             (Hermes, Qwen 2/2.5/3, SmolLM3: what their chat templates teach; one block per
             call, text around them is the reply's content)

A model's form comes from its chat template (ModelInfo.tool_format, set by the kernel).
A block that is not valid JSON with a name stays in the content, as the model wrote it.
"""
from __future__ import annotations

import json
import re
import uuid

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse(text: str, tool_format: str) -> dict:
    """The assistant message for text: {"role", "content", and "tool_calls" if any}."""
    calls, kept = [], text
    if tool_format == "hermes":
        for m in HERMES.finditer(text):
            call = _call(m.group(1))
            if call is not None:
                calls.append(call)
                kept = kept.replace(m.group(0), "", 1)
    message = {"role": "assistant", "content": kept.strip() or None if calls else text}
    if calls:
        message["tool_calls"] = calls
    return message


def _call(body: str) -> dict | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args)}}
