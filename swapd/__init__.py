"""swapd: one supervisor for the one llama-server a GPU host can hold.

Clients ask any configured model by name through an OpenAI-compatible API; swapd starts,
stops and swaps llama-server on demand. See README.md and docs/.
"""

__version__ = "0.1.0"
