"""A LangChain script: ChatOpenAI pointed at llmos by its base URL, nothing else.

    pip install langchain-openai        # in an environment of its own
    llmos up -d && llmos serve &
    python examples/openai/langchain_chat.py
"""
from langchain_openai import ChatOpenAI

llm = ChatOpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none", model="tiny",
                 max_tokens=8, temperature=0)
print(llm.invoke("add 12 47").content)
for part in llm.stream("reverse c a t"):
    print(part.content, end="", flush=True)
print()
