"""An ordinary OpenAI-client script: nothing in it knows llmos but the base URL.

    llmos up -d && llmos serve &
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=none python examples/openai/chat.py
"""
from openai import OpenAI

client = OpenAI()       # OPENAI_BASE_URL and OPENAI_API_KEY from the environment
reply = client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "add 12 47"}], max_tokens=8)
print(reply.choices[0].message.content)
for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "reverse c a t"}], stream=True):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
